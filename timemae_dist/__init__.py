"""timemae-dist: TimeMAE model, objectives, kernels, distributed training and evaluation."""

__version__ = "0.1.0"
