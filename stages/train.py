"""`python -m stages.train`: the command line of the `train` stage; the stage itself is flowback/jobs/train.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("train")
