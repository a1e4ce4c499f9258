"""Typed pretraining config and the generated DeepSpeed config."""

from __future__ import annotations

import pytest

from data_pipeline.typedconfig import ConfigError
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.ds_config import build_ds_config

from .conftest import REPO, TINY_CONFIG

HAR_CONFIG = REPO / "configs" / "pretrain" / "har.yaml"


def test_shipped_configs_load():
    tiny = load_pretrain_config(TINY_CONFIG)
    assert tiny.model.d_model == 16 and tiny.model.in_channels is None
    assert tiny.run.name.startswith("pretrain-")  # null name -> fresh timestamped run
    har = load_pretrain_config(HAR_CONFIG)
    m = har.model
    assert (m.d_model, m.num_layers, m.num_heads, m.wave_length, m.mask_ratio, m.momentum) == (64, 8, 4, 8, 0.6, 0.99)
    assert (m.vocab_size, m.alpha, m.beta, m.dropout) == (192, 5.0, 1.0, 0.2)
    assert har.trainer.micro_batch_size == 128 and har.deepspeed.lr == 1e-3


def test_overrides_documented_keys():
    cfg = load_pretrain_config(
        TINY_CONFIG,
        [
            "data.store=/x/store",
            "trainer.num_workers=2",
            "trainer.max_steps=7",
            "trainer.micro_batch_size=4",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=bf16",
            "run.storage_path=/x/runs",
            "run.name=abc",
            "run.checkpoint_every=3",
            "run.log_every=1",
        ],
    )
    assert cfg.data.store == "/x/store" and cfg.trainer.num_workers == 2 and cfg.trainer.max_steps == 7
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    assert cfg.run.run_dir.as_posix() == "/x/runs/abc"


@pytest.mark.parametrize(
    "override, key",
    [
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.precision=fp8", "deepspeed.precision"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("deepspeed.offload_params=true", "deepspeed.offload_params"),
        ("trainer.bogus=1", "trainer.bogus"),
        ("deepspeed.warmup_steps=0", "deepspeed.warmup_steps"),
        ("deepspeed.precision=fp16", "deepspeed.precision"),  # fp16 needs GPUs
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(TINY_CONFIG, [override])
    assert e.value.key == key, str(e.value)


def test_global_batch_must_divide():
    with pytest.raises(ConfigError, match="not divisible"):
        load_pretrain_config(TINY_CONFIG, ["trainer.num_workers=3", "trainer.global_batch_size=100"])
    cfg = load_pretrain_config(TINY_CONFIG, ["trainer.num_workers=2", "trainer.global_batch_size=128"])
    assert cfg.trainer.grad_accum == 4 and cfg.trainer.global_batch == 128


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_generated(stage):
    cfg = load_pretrain_config(
        TINY_CONFIG, [f"deepspeed.zero_stage={stage}", "trainer.grad_accum=2", "deepspeed.precision=bf16"]
    )
    ds = build_ds_config(cfg, world_size=2, total_steps=50)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 16 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["weight_decay"] == 0.01
    sched = ds["scheduler"]
    assert sched["type"] == "WarmupCosineLR" and sched["params"]["total_num_steps"] == 50
    assert sched["params"]["warmup_num_steps"] == 2 and ds["gradient_clipping"] == 1.0


def test_ds_config_offload_and_fp16():
    cfg = load_pretrain_config(
        TINY_CONFIG,
        ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
         "trainer.use_gpu=true", "deepspeed.precision=fp16"],
    )
    ds = build_ds_config(cfg, world_size=4, total_steps=10)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeed's CPU Adam for offload
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
