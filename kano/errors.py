"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class KanoError(Exception):
    """A user-facing error: bad input, missing file, unusable configuration.

    The message must say what was expected and what was found ("X must be Y, got Z").
    """
