"""timemae-dist data pipeline: recordings -> windows -> splits/stats -> Zarr v3 / Arrow stores -> loader.

This package never imports ``timemae_dist`` (data flows one way).
"""

__version__ = "0.1.0"
