"""Which models each evaluation command runs."""

from timemae_dist.eval.config import load_eval_config
from timemae_dist.eval.protocol import model_plan


def test_model_plan() -> None:
    assert model_plan("linear", False) == [("pretrained", "linear")]
    assert model_plan("linear", True) == [
        ("pretrained", "linear"), ("random_init", "linear"), ("scratch", "finetune")
    ]
    # the demo's fast variant: random-init probe only
    assert model_plan("linear", True, scratch=False) == [("pretrained", "linear"), ("random_init", "linear")]
    # fine-tuning's only baseline is supervised from scratch
    assert model_plan("finetune", True, scratch=False) == [("pretrained", "finetune"), ("scratch", "finetune")]


def test_scratch_baseline_override() -> None:
    cfg = load_eval_config(None, ["baselines=true", "scratch_baseline=false"])
    assert cfg.baselines and not cfg.scratch_baseline
