"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class Phi3FastError(Exception):
    """Bad input from the user (a file, an argument, a checkpoint); the message names what and where."""


class ArgumentError(Phi3FastError):
    """A bad value of one argument of a library call. The message starts with the argument's Python name
    (`batch_size must be >= 1`); the CLI says its flag instead (`--batch-size must be >= 1`)."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument, self.problem = argument, problem
        super().__init__(f"{argument} {problem}")
