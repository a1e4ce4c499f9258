"""Errors a user can cause: one clear line, before any worker starts."""

from __future__ import annotations

import time

import pytest

from launch.pretrain import main
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.driver import run_distributed
from timemae_dist.train.errors import PretrainError

from .conftest import TINY_CONFIG, tiny_overrides


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(TINY_CONFIG), *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("model.in_channels=5",), "model.in_channels: is 5 but the data has 3"),
        (("model.seq_len=64",), "model.seq_len"),
        (("trainer.micro_batch_size=200", "trainer.num_workers=2"), "trainer.micro_batch_size"),
        (("trainer.global_batch_size=100", "trainer.num_workers=3"), "trainer.global_batch_size"),
        (("deepspeed.zero_stage=4",), "deepspeed.zero_stage"),
        (("data.split=nope",), "data.split"),
    ],
)
def test_bad_config_one_line(capsys, tiny_store, tmp_path, extra, needle):
    rc, err = _cli(capsys, *tiny_overrides(tiny_store, tmp_path, "bad", *extra))
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "bad").exists()  # nothing started, nothing written


def test_missing_store(capsys, tmp_path):
    rc, err = _cli(capsys, *tiny_overrides(tmp_path / "no-store", tmp_path, "bad"))
    assert rc == 2 and len(err.splitlines()) == 1
    assert "data.store" in err and "does not exist" in err and "timemae data prepare" in err


def test_single_process_bad_input_too(capsys, tmp_path):
    rc = main(["--single-process", str(TINY_CONFIG), *tiny_overrides(tmp_path / "none", tmp_path, "bad")])
    assert rc == 2 and "data.store" in capsys.readouterr().err


def test_too_many_workers_fails_fast(ray_local, tiny_store, tmp_path):
    cfg = load_pretrain_config(
        TINY_CONFIG, tiny_overrides(tiny_store, tmp_path, "big", "trainer.num_workers=3")
    )
    t0 = time.perf_counter()
    with pytest.raises(PretrainError) as e:
        run_distributed(cfg)
    msg = str(e.value)
    assert "trainer.num_workers" in msg and "Ray cluster resources: CPU=2" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "big" / "pids").exists()  # no worker ever started


@pytest.mark.parametrize("key", ["cpu_dropout", "cpu_fused"])
def test_cpu_kernel_on_without_a_compiler_fails_before_ray(tiny_store, tmp_path, key):
    """trainer.cpu_dropout=on / trainer.cpu_fused=on where the kernel cannot be built: one line
    naming the option and the fix, before Ray starts (no run directory)."""
    import os
    import subprocess
    import sys

    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "TIMEMAE_CACHE_DIR": str(tmp_path / "cache")}
    for var in ("CC", "TIMEMAE_CPU_DROPOUT", "TIMEMAE_CPU_FUSED", "RAY_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.pretrain", str(TINY_CONFIG),
         *tiny_overrides(tiny_store, tmp_path, "nocc", f"trainer.{key}=on")],
        env=env, capture_output=True, text=True, timeout=120, cwd=str(TINY_CONFIG.parents[2]),
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-2000:]
    assert len(err.splitlines()) == 1, err
    assert f"trainer.{key}" in err and "no C compiler" in err and f"trainer.{key}=auto" in err, err
    assert not (tmp_path / "nocc").exists()


def test_diverged_distributed_run_fails_naming_the_step(ray_local, tiny_store, tmp_path):
    """Under Ray Train + DeepSpeed (2 workers) a non-finite loss stops every rank at the same
    logging step with the divergence message; no checkpoint of the diverged model is written."""
    cfg = load_pretrain_config(TINY_CONFIG, tiny_overrides(
        tiny_store, tmp_path, "div", "trainer.num_workers=2", "deepspeed.zero_stage=2", "trainer.max_steps=6",
        "run.log_every=2", "run.checkpoint_every=0", "run.max_failures=0", "run.eval_every=0", "model.alpha=1e39"))
    with pytest.raises(Exception) as e:
        run_distributed(cfg)
    assert "step 2: training diverged (loss/total=" in str(e.value), str(e.value)[-2000:]
    assert not list((tmp_path / "div").glob("checkpoint_*"))


def test_resuming_with_another_architecture_or_engine_fails_before_anything_runs(tiny_store, tmp_path, capsys):
    """Re-running a run name resumes its checkpoint: a changed architecture, or the other engine
    (--single-process vs Ray Train + DeepSpeed), is one line naming the keys and the fix, before
    any model is built or Ray starts; the checkpoint is untouched."""
    over = tiny_overrides(tiny_store, tmp_path, "arch", "trainer.max_steps=2")
    assert main(["--single-process", str(TINY_CONFIG), *over]) == 0
    ckpt = tmp_path / "arch" / "checkpoint_0000002"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    capsys.readouterr()
    rc, err = _cli(capsys, "--single-process", *over[:-1], "trainer.max_steps=4", "model.d_model=24",
                   "model.num_layers=3")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "model.d_model=16 (this config: 24), model.num_layers=2 (this config: 3)" in err
    assert "new run.name to start fresh" in err
    # the optimizer state of one flat buffer (trainer.flat_params) does not load per parameter
    rc, err = _cli(capsys, "--single-process", *over[:-1], "trainer.max_steps=4", "trainer.flat_params=false")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "trainer.flat_params=true (this run: per-parameter optimizer state)" in err
    rc, err = _cli(capsys, *over[:-1], "trainer.max_steps=4")  # distributed: fails before Ray starts
    assert rc == 2 and "written by --single-process (plain PyTorch), this run uses Ray Train + DeepSpeed" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "arch").glob("checkpoint_*")) == ["checkpoint_0000002"]
    # a hyperparameter that does not shape the parameters may change on resume
    assert main(["--single-process", str(TINY_CONFIG), *over[:-1], "trainer.max_steps=3", "model.dropout=0.0"]) == 0
