"""`python -m stages.sample`: the command line of the `sample` stage; the stage itself is flowback/jobs/sample.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("sample")
