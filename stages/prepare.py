"""`python -m stages.prepare`: the command line of the `prepare` stage; the stage itself is flowback/jobs/prepare.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("prepare")
