"""`python -m stages.table`: the command line of the `table` stage; the stage itself is flowback/jobs/table.py."""

from flowback.stage import main

if __name__ == "__main__":
    main("table")
