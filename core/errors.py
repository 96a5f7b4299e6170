"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class KanoError(Exception):
    """A user-facing error: bad input, missing file, unusable configuration.

    The message must say what was expected and what was found ("X must be Y, got Z").
    """


def os_error_message(exc: OSError) -> str:
    """An OSError the file system raised, as one line naming the path: 'PATH must be ..., got REASON'."""
    reason = exc.strerror or type(exc).__name__
    path = exc.filename
    if path is None:
        return f"the file system must accept what Kano writes, got {reason} ({type(exc).__name__}, errno {exc.errno})"
    path = str(path).removesuffix(".part")  # the temporary name of an atomic write is not the user's
    if isinstance(exc, NotADirectoryError):
        return f"{path} must be under a folder, got {reason}: a part of that path is a file"
    if isinstance(exc, FileNotFoundError):
        return f"{path} must exist or be creatable, got {reason}"
    if isinstance(exc, PermissionError):
        return f"{path} must be writable (and readable), got {reason}"
    return f"{path} must be usable, got {reason} ({type(exc).__name__})"
