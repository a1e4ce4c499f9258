"""`sbatch slurm/pretrain.sh configs/pretrain/tiny.yaml ...` on a real (one-host) Slurm cluster.

Covers: the Ray cluster coming up on the allocation with the allocation's resources, the
driver's defaults (num_workers from the CPUs, run.name from the job), checkpoint + TensorBoard
events, Ray logs copied to the run dir, teardown, a requeue (the script's own `scontrol requeue`
on SIGUSR1) resuming from the latest checkpoint, and slurm/tensorboard.sh.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import SCRIPT, TINY_CONFIG, free_port_block, job_output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = SCRIPT.parents[1]


def ray_env(slurm) -> dict[str, str]:
    """Ray settings for a job on this shared test host: a port block nothing else uses, a small
    object store (the tiny run needs next to none)."""
    return {"RAY_PORT": str(free_port_block(400)), "RAY_OBJECT_STORE_MEMORY": str(100 * 1024**2)}


def summary_of(out: str) -> dict:
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith("{"), f"job output does not end with the JSON summary:\n{out[-3000:]}"
    return json.loads(last)


def test_sbatch_tiny_pretrain(slurm, tiny_store: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    t0 = time.monotonic()
    job = slurm.sbatch(
        ["--cpus-per-task=2", f"--output={tmp_path}/slurm-%x-%j.out", str(SCRIPT), str(TINY_CONFIG),
         f"data.store={tiny_store}", f"run.storage_path={storage}", "trainer.max_steps=4",
         "run.checkpoint_every=2"],
        cwd=REPO, env=ray_env(slurm),
    )
    info = slurm.wait(job, timeout=600)
    out = job_output(slurm, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out[-4000:]}"
    # the cluster came up on the allocation with its resources; the driver got the defaults
    assert "ray cluster up: 1/1 nodes alive, CPU=2 GPU=0" in out, out[-4000:]
    name = f"pretrain-{job}"  # no --job-name: the run is named after the job id
    assert f"run.name={name}" in out and "trainer.num_workers=2" in out, out[-4000:]
    assert f"run {name}: starting fresh" in out
    summary = summary_of(out)
    assert summary["steps"] == 4, summary
    run_dir = storage / name
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent == run_dir and ckpt.is_dir() and any(ckpt.iterdir()), summary
    assert list((run_dir / "tb").rglob("events.out.tfevents*")), f"no TensorBoard events under {run_dir / 'tb'}"
    # Ray's logs were copied to the run directory, the node's temp dir is gone
    logs = run_dir / "slurm" / f"job-{job}"
    assert (logs / f"ray-node0-{slurm.nodes[0]}.log").is_file() or list(logs.glob("ray-node0-*.log"))
    assert list(logs.glob("ray-node0-*/raylet.out")), sorted(p.name for p in logs.iterdir())
    assert not list(slurm.ray_tmp.glob(f"ray-{job}-*")), "Ray temp dir left behind"
    print(f"job {job}: {time.monotonic() - t0:.0f} s")


def test_requeue_resumes_from_checkpoint(slurm, tiny_store: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    name = "requeue-test"
    steps = 300
    job = slurm.sbatch(
        ["--cpus-per-task=1", f"--job-name={name}", f"--output={tmp_path}/slurm-%x-%j.out", str(SCRIPT),
         str(TINY_CONFIG), f"data.store={tiny_store}", f"run.storage_path={storage}",
         f"trainer.max_steps={steps}", "run.checkpoint_every=25", "run.log_every=25", "run.keep_checkpoints=2"],
        cwd=REPO, env=ray_env(slurm),
    )
    run_dir = storage / name  # named after --job-name: a requeue (same job) finds it again
    deadline = time.monotonic() + 400
    while not list(run_dir.glob("checkpoint_*/meta.json")):
        info = slurm.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"job ended before its first checkpoint: {info}"
        assert time.monotonic() < deadline, "no checkpoint within 400 s"
        time.sleep(0.5)
    # what `#SBATCH --signal=B:USR1@N` sends before the time limit: the script requeues itself
    # (`scontrol requeue`), Slurm then stops the job with SIGTERM and the trap tears down
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    # a requeued job is held back ~2 minutes by Slurm; let it start again now
    deadline = time.monotonic() + 120
    while slurm.job(job)["JobState"] != "PENDING":
        assert time.monotonic() < deadline, slurm.job(job)
        time.sleep(0.5)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait(job, timeout=600)
    out = job_output(slurm, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out[-4000:]}"
    assert info["Restarts"] == "1", info
    # first run started fresh and was stopped by the requeue (trap -> teardown), the second resumed
    assert f"run {name}: starting fresh" in out, out[-4000:]
    assert f"time limit near: requeueing job {job}" in out, out[-6000:]
    assert "received SIGTERM: stopping the driver and the Ray cluster" in out, out[-6000:]
    m = re.search(rf"run {name}: resuming from \S*checkpoint_0*(\d+)", out)
    assert m, f"second run did not resume:\n{out[-4000:]}"
    resumed_at = int(m.group(1))
    assert 25 <= resumed_at < steps and resumed_at % 25 == 0, resumed_at
    assert out.index("starting fresh") < out.index("restart 1") < m.start()
    summary = summary_of(out)
    assert summary["steps"] == steps, summary
    assert Path(summary["checkpoint"]).name.endswith(str(steps)), summary


def test_sbatch_tensorboard_serves(slurm, tmp_path: Path) -> None:
    """`sbatch slurm/tensorboard.sh LOGDIR PORT` serves TensorBoard and prints the forwarding line."""
    import urllib.request

    from tests.slurm.conftest import free_port

    port = free_port()
    (tmp_path / "runs").mkdir()
    job = slurm.sbatch(
        [f"--output={tmp_path}/tb-%j.out", str(SCRIPT.parent / "tensorboard.sh"), str(tmp_path / "runs"), str(port)],
        cwd=REPO,
    )
    out_file = tmp_path / f"tb-{job}.out"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                info = slurm.job(job)
                assert info["JobState"] in ("PENDING", "RUNNING"), f"{info}\n{out_file.read_text() if out_file.exists() else ''}"
                assert time.monotonic() < deadline, out_file.read_text() if out_file.exists() else "no output"
                time.sleep(1)
        out = out_file.read_text()
        assert f"ssh -N -L 6006:{slurm.nodes[0]}:{port}" in out or f":{port} " in out, out
    finally:
        slurm.run("scancel", str(job), check=False)
    assert slurm.wait(job, timeout=60)["JobState"] == "CANCELLED"
