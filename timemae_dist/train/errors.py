"""User-facing errors of pretraining: one clear line naming the thing and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PretrainError", "open_store_or_fail"]


class PretrainError(ValueError):
    """A problem a user can fix (store, config vs. data, cluster size). One line, names the fix."""


def open_store_or_fail(path: str) -> Any:
    """Open a store, turning 'missing / not a store / corrupt' into one :class:`PretrainError`."""
    from data_pipeline.store import open_store

    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainError(
            f"data.store: store {str(p)!r} does not exist; build it with "
            "`timemae data prepare CONFIG` or point data.store=PATH at an existing store"
        )
    if not (p / "manifest.json").is_file():
        raise PretrainError(
            f"data.store: {str(p)!r} is not a store (no manifest.json); point data.store=PATH at "
            "a directory written by `timemae data prepare`"
        )
    try:
        return open_store(str(p))
    except Exception as e:  # the data pipeline's own errors are already one clear line
        raise PretrainError(f"data.store: cannot open {str(p)!r}: {e}") from None
