"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single sentence on stderr and exit code 2; anything else is a fault of
ours (exit 1, traceback kept)."""

import os
import shutil


class InputError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteError(Exception):
    """Training produced a NaN or infinite loss or gradient; raised before the optimizer applies it."""


class StoppedBySignal(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was saved at the next step boundary."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StorageError(Exception):
    """The disk refused a write (full, over quota); what was saved before is intact."""


# errno values that mean "the storage refused the write", and the words other libraries wrap them in
# (torch's checkpoint writer, safetensors and tokenizers in Rust say "No space left on device (os error 28)").
STORAGE_ERRNOS = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only"}
STORAGE_WORDS = {"no space left on device": 28, "disk quota exceeded": 122, "read-only file system": 30,
                 "os error 28": 28, "os error 122": 122, "os error 30": 30}


# torch.save's zip writer reports a failed write without the OS error ("basic_ios::clear: iostream error",
# then "unexpected pos 7176576 vs 7176468", seen on a full tmpfs). A write that failed with a RuntimeError or
# OSError where less than this is left free is taken for a full disk.
NEARLY_FULL_BYTES = 16 * 2**20


def storage_failure(exc: BaseException | None, written_to: str | os.PathLike | None = None) -> str | None:
    """What the storage refused, when `exc` or anything in its chain of causes is a full disk, an
    exceeded quota or a read-only file system -- raised as OSError, or wrapped by another library in
    its own exception type with the OS's words in the message; or, given the folder being written, a
    write error where that file system has (almost) no room left. None otherwise."""
    seen: set[int] = set()
    io_like = False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        number = getattr(exc, "errno", None)
        if isinstance(exc, OSError) and number in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[number]
        text = str(exc).lower()
        for words, code in STORAGE_WORDS.items():
            if words in text:
                return STORAGE_ERRNOS[code]
        io_like = io_like or isinstance(exc, RuntimeError | OSError)
        exc = exc.__cause__ or exc.__context__
    if io_like and written_to is not None:
        free = free_bytes(written_to)
        if free is not None and free < NEARLY_FULL_BYTES:
            return STORAGE_ERRNOS[28]
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    here = os.path.abspath(path)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None
