"""`python -m stages.metricnet`: the command line of the `metricnet` stage; the stage itself is flowback/jobs/metricnet.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("metricnet")
