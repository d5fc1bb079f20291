"""The errors of the package's library layers, each with a message a user can act on.

Library functions speak of their arguments (`model`, `start`, `output`); the command line reports an
`ArgumentError` under its own flag (`--model`, `--start`, `--output`).
"""


class ArgumentError(ValueError):
    """A bad value of the argument `argument`; the message reads after its name: "model nope: no such folder",
    "steps must be at least 1", "output: the folder x does not exist"."""

    def __init__(self, argument: str, message: str):
        super().__init__(with_argument(argument, message))
        self.argument = argument
        self.detail = message


def with_argument(argument: str, message: str) -> str:
    """`message` after the argument's name (or flag): joined with a space unless it starts with a colon."""
    return argument + ("" if message.startswith((":", ",")) else " ") + message


class MediaError(ValueError):
    """A media file that cannot be used, with a message that names the file and the problem."""


class MissingExtra(ImportError):
    """An optional part of the package (an extra) is not installed; the message says what to install."""
