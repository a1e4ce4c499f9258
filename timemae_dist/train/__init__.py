"""Distributed pretraining: Ray Train orchestrating DeepSpeed-ZeRO workers.

All Ray/DeepSpeed wiring of timemae-dist lives in this package. Entry points:
``launch/pretrain.py`` (driver) and ``launch/export.py``.
"""

from timemae_dist.train.config import PretrainConfig, load_pretrain_config

__all__ = ["PretrainConfig", "load_pretrain_config"]
