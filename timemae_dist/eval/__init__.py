"""Evaluation of pretrained encoders: linear probe, fine-tuning, baselines, label-scarce protocol.

Model selection (probe C, fine-tuning epoch) only ever looks at the validation split; the test
split is scored once, after selection. Entry point: ``timemae evaluate linear|finetune|embed``
(:mod:`launch.evaluate`). During pretraining the trainer calls
:func:`linear_probe_val_accuracy` on rank 0 (``eval/linear_val_acc``).
"""

from timemae_dist.eval.config import EmbedConfig, EvalConfig, FinetuneConfig, LinearProbeConfig, load_eval_config
from timemae_dist.eval.errors import EvalError
from timemae_dist.eval.linear import linear_probe_val_accuracy, select_probe
from timemae_dist.eval.metrics import classification_metrics

__all__ = [
    "EvalConfig",
    "LinearProbeConfig",
    "FinetuneConfig",
    "EmbedConfig",
    "load_eval_config",
    "EvalError",
    "linear_probe_val_accuracy",
    "select_probe",
    "classification_metrics",
    "run_evaluation",
    "run_embed",
]


def __getattr__(name):  # heavy imports (model, matplotlib) only when used
    if name == "run_evaluation":
        from timemae_dist.eval.protocol import run_evaluation

        return run_evaluation
    if name == "run_embed":
        from timemae_dist.eval.embed import run_embed

        return run_embed
    raise AttributeError(name)
