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


def _clean_env(**extra: str) -> dict[str, str]:
    import os

    drop = ("TIMEMAE_CPU_DROPOUT", "TIMEMAE_MKL_AVX512", "LD_PRELOAD",
            "TIMEMAE_MKL_AVX512_REEXEC", "TIMEMAE_MKL_AVX512_MATCHED", "RAY_ADDRESS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_embedded_ray_workers_follow_the_off_switches(store, tmp_path):
    """`timemae pretrain` re-executes its driver with the GEMM shim preloaded; with the options off,
    the workers of its embedded Ray (which inherit the driver's environment) must run without it
    and with torch's eager dropout masks."""
    import shutil

    from timemae_dist import mkl_avx512

    timemae = shutil.which("timemae", path=str(Path(sys.executable).parent))
    cmd = [timemae, "pretrain", str(TINY), f"data.store={store}", f"run.storage_path={tmp_path}", "run.name=offs",
           "trainer.max_steps=2", "trainer.micro_batch_size=8", "trainer.mkl_avx512=off",
           "trainer.cpu_dropout=off", "run.checkpoint_every=0"]
    out = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    logs = out.stdout + out.stderr
    assert "rank 0: dropout masks: eager torch ops (TIMEMAE_CPU_DROPOUT=off)" in logs, logs[-3000:]
    if mkl_avx512.support().applies:
        assert "rank 0: fp32 GEMM: oneMKL AVX2 path on an AVX-512 AMD CPU" in logs, logs[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 2


_LEAN_PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.driver import connect_ray

where = connect_ray(load_pretrain_config(sys.argv[2], [f"run.storage_path={sys.argv[3]}"]))
raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid


@ray.remote(num_cpus=1)
def task():
    return os.getpid()


task_pid = ray.get(task.remote())  # tasks still get a worker (started on demand)
time.sleep(6)  # a prestarted or finished worker is idle by now; lean: killed after 1 s
idle = []
for pid in os.listdir("/proc"):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
    if ppid == raylet and comm.startswith("ray::IDLE"):
        idle.append(int(pid))
print(json.dumps({"where": where, "idle_workers": len(idle), "task_ran": task_pid > 0,
                  "watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}))
ray.shutdown()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_embedded_ray_is_lean_unless_switched_off(tmp_path):
    """The embedded local Ray keeps no idle worker processes and starts no preemption watcher (they share
    the training's CPUs; benchmarks/bench_step_ab.py --ab raybg); TIMEMAE_LEAN_LOCAL_RAY=0 keeps Ray's defaults."""
    from timemae_dist.train.driver import LEAN_ENV

    def probe(**env: str) -> dict:
        clean = _clean_env(**env)
        clean.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # e.g. left by an embedded Ray of this process
        out = subprocess.run([sys.executable, "-c", _LEAN_PROBE, str(REPO), str(TINY), str(tmp_path)],
                             env=clean, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    lean = probe()
    assert lean["where"].startswith("embedded local Ray") and lean["task_ran"]
    assert lean["idle_workers"] == 0 and lean["watcher"] == "0"
    default = probe(**{LEAN_ENV: "0"})
    assert default["idle_workers"] >= 1 and default["watcher"] is None


def test_embedded_ray_lean_switch_bad_value(tmp_path):
    """A value other than 0/1 is one clear error naming the variable, before Ray starts."""
    from timemae_dist.train.driver import LEAN_ENV

    out = subprocess.run([sys.executable, "-c", _LEAN_PROBE, str(REPO), str(TINY), str(tmp_path)],
                         env=_clean_env(**{LEAN_ENV: "off"}), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"${LEAN_ENV}='off': use 1" in out.stderr and "or 0 (Ray's defaults)" in out.stderr, out.stderr[-2000:]
    assert "Started a local Ray instance" not in out.stderr
