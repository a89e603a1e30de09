"""`python -m stages.reference`: the command line of the `reference` stage; the stage itself is flowback/jobs/reference.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("reference")
