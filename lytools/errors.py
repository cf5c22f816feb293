"""The errors a user can see. Each becomes one stderr line and an exit code in cli.py."""

from __future__ import annotations


class LytoolsError(Exception):
    """A failure the user can act on; its message is the whole one-line report."""

    exit_code = 1


class UsageError(LytoolsError):
    """Options that are wrong or contradict each other (or the inputs): exit 2, like Click's own."""

    exit_code = 2


class FileFormatError(LytoolsError):
    """A file is not what it claims to be: bad header, truncated, unknown dtype, bad pickle."""


class UnsafeFileError(FileFormatError):
    """A pickled file asks to run code or build objects beyond tensors."""


class NetworkError(LytoolsError):
    """A network module is incomplete, inconsistent, or of an algorithm lytools cannot apply."""


class UnsupportedError(LytoolsError):
    """A valid input that lytools deliberately refuses (e.g. T-LoRA merge)."""


class MatchError(LytoolsError):
    """Network modules or checkpoint keys that do not line up."""


class OutputExistsError(LytoolsError):
    """The output exists and --overwrite was not given."""


class DeviceError(LytoolsError):
    """The requested compute device is not available."""


def os_reason(exc: OSError) -> str:
    """Return why an I/O call failed as the user reads it: strerror, without Python's '[Errno N]'."""
    return exc.strerror or str(exc) or type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """Return an I/O error as the user reads it: the file it names, when it names one, and the reason."""
    reason = os_reason(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def debugging() -> bool:
    """True when LYTOOLS_DEBUG=1 asks for the traceback of every error."""
    import os

    return os.environ.get("LYTOOLS_DEBUG") == "1"


def print_debug_traceback(exc: BaseException) -> None:
    """Print `exc`'s traceback on stderr when debugging(): for errors reported as one line (a batch's failed file)."""
    if debugging():
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
