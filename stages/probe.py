"""`python -m stages.probe`: the command line of the `probe` stage; the stage itself is flowback/jobs/probe.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("probe")
