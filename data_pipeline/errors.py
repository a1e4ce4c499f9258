"""User-facing errors of the data pipeline: one clear line naming the thing and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data (file, column, value) a user can fix. Message: what, where, and the fix."""


class StoreError(DataError):
    """A store is missing, incomplete, corrupt, or does not match what the caller expects."""
