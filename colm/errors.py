"""The errors colm raises for users: each message says what went wrong and what to do."""
from __future__ import annotations


class ColmError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


class MissingPackageError(ColmError):
    pass


class HashMismatchError(ColmError):
    pass


class TokenizerMismatchError(ColmError):
    pass
