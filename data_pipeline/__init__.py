"""timemae-dist data pipeline: recordings -> windows -> splits/stats -> Zarr v3 / Arrow stores -> loader.

This package never imports ``timemae_dist`` (data flows one way). The public entry points are
re-exported lazily so ``import data_pipeline`` stays cheap (no torch, zarr or pyarrow):

    from data_pipeline import open_loader, open_store, prepare, load_data_config
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "open_loader": "data_pipeline.loader",
    "StreamingLoader": "data_pipeline.loader",
    "open_store": "data_pipeline.store",
    "verify_store": "data_pipeline.store",
    "StoreWriter": "data_pipeline.store",
    "prepare": "data_pipeline.prepare",
    "load_data_config": "data_pipeline.config",
    "DataConfig": "data_pipeline.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
