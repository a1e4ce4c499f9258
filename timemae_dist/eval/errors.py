"""User-facing errors of evaluation: one clear line naming the thing and the fix."""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """A problem a user can fix (checkpoint, store, splits without labels). One line with the fix."""
