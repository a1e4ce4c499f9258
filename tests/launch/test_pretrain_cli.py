"""`timemae pretrain` / `python -m launch.pretrain` and `timemae export` entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from data_pipeline.store import StoreWriter

    path = tmp_path_factory.mktemp("cli") / "store"
    rng = np.random.default_rng(0)
    with StoreWriter(path, "arrow", ["a", "b"], 16, chunk_windows=16, shard_windows=64) as w:
        for split, n in (("train", 64), ("val", 16), ("test", 16)):
            w.append(split, rng.standard_normal((n, 2, 16)).astype(np.float32), label=-1, subject=0, recording=0, offset=0)
        w.finalize({"normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})
    return path


def test_parser_accepts_documented_flags():
    from launch.pretrain import build_parser

    args = build_parser().parse_args(["c.yaml", "trainer.num_workers=2", "--address", "127.0.0.1:6379", "--single-process"])
    assert args.config == "c.yaml" and args.overrides == ["trainer.num_workers=2"]
    assert args.address == "127.0.0.1:6379" and args.single_process


def test_single_process_module_run_and_export(store, tmp_path):
    cmd = [
        sys.executable, "-m", "launch.pretrain", "--single-process", str(TINY), f"data.store={store}",
        f"run.storage_path={tmp_path}", "run.name=cli", "trainer.max_steps=3", "trainer.micro_batch_size=8",
        "run.log_every=1",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("run cli: starting fresh")
    summary = json.loads(lines[-1])
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"]) and summary["windows_per_s"] > 0
    assert Path(summary["checkpoint"]).is_dir()
    from launch.export import main as export_main

    assert export_main([str(tmp_path / "cli"), str(tmp_path / "exp")]) == 0
    from timemae_dist.model import TimeMAE

    model = TimeMAE.from_pretrained(tmp_path / "exp")
    assert model.config.in_channels == 2 and model.config.seq_len == 16


def test_export_bad_path(tmp_path, capsys):
    from launch.export import main as export_main

    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err
