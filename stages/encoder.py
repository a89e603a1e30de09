"""`python -m stages.encoder`: the command line of the `encoder` stage; the stage itself is flowback/jobs/encoder.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("encoder")
