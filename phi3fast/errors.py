"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class Phi3FastError(Exception):
    """Bad input from the user (a file, an argument, a checkpoint); the message names what and where."""
