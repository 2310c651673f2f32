"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single sentence on stderr and exit code 2; anything else is a fault of
ours (exit 1, traceback kept)."""


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
