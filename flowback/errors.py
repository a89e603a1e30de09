"""The base of every error FlowBack raises for bad input (files, params, diverging runs).

Stages print these as one clear line and exit non-zero; anything else is a bug and keeps its traceback.
"""


class FlowBackError(Exception):
    """An error caused by the input or the run, with a message that says what to fix."""


class ParamsError(FlowBackError, ValueError):
    """A params file is invalid; the message names every offending key by its path."""


class Interrupted(FlowBackError):
    """Ctrl-C (SIGINT) stopped a stage; the message says what a rerun picks up. Exit status 130 (128 + SIGINT)."""
