"""`python -m stages.decoder`: the command line of the `decoder` stage; the stage itself is flowback/jobs/decoder.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("decoder")
