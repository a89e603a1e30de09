"""`python -m stages.evaluate`: the command line of the `evaluate` stage; the stage itself is flowback/jobs/evaluate.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("evaluate")
