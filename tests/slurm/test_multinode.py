"""Multi-node path: `sbatch --nodes=2 slurm/pretrain.sh` on the two Slurm nodes of the test cluster.

Both Slurm nodes live on this host (two slurmd), so the job runs two `ray start` processes with
separate ports (RAY_NODE_PORT_STRIDE) and temp dirs: a head and a worker node joining it over
TCP. Each Ray node offers 1 CPU and the driver runs 2 workers x 1 CPU, so Ray must place one
training worker per node: rank 1 runs on the worker node, reads the store, reports its part of
every checkpoint to the shared storage path, and the run completes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import SCRIPT, TINY_CONFIG, free_port_block, job_output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_ray_nodes_one_worker_each(slurm, tiny_store: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    block = 200
    t0 = time.monotonic()
    job = slurm.sbatch(
        ["--nodes=2", "--cpus-per-task=1", "--job-name=two-nodes", f"--output={tmp_path}/slurm-%x-%j.out",
         str(SCRIPT), str(TINY_CONFIG), f"data.store={tiny_store}", f"run.storage_path={storage}",
         "trainer.max_steps=4", "run.checkpoint_every=2"],
        cwd=SCRIPT.parents[1],
        env={"RAY_PORT": str(free_port_block(2 * block)), "RAY_PORT_BLOCK": str(block),
             "RAY_NODE_PORT_STRIDE": str(block), "RAY_OBJECT_STORE_MEMORY": str(100 * 1024**2)},
    )
    info = slurm.wait(job, timeout=600)
    out = job_output(slurm, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out[-4000:]}"
    assert f"on 2 node(s): {' '.join(slurm.nodes)}" in out, out[:2000]
    assert "ray cluster up: 2/2 nodes alive, CPU=2 GPU=0" in out, out[-4000:]
    assert "trainer.num_workers=2" in out  # 2 nodes x 1 CPU / cpus_per_worker 1
    assert "2 worker(s) x 1 CPU" in out, out[-4000:]
    summary = json.loads(out.rstrip("\n").splitlines()[-1])
    assert summary["steps"] == 4, summary
    run_dir = storage / "two-nodes"
    ckpt = Path(summary["checkpoint"])
    assert ckpt.parent == run_dir and ckpt.is_dir() and any(ckpt.iterdir()), summary
    assert list((run_dir / "tb").rglob("events.out.tfevents*"))
    # one training worker ran on each Ray node: both nodes' logs hold a RayTrainWorker
    logs = run_dir / "slurm" / f"job-{job}"
    for idx, node in enumerate(slurm.nodes):
        node_logs = logs / f"ray-node{idx}-{node}"
        assert node_logs.is_dir(), sorted(p.name for p in logs.iterdir())
        workers = [p for p in node_logs.glob("worker-*.out") if "RayTrainWorker" in p.read_text(errors="replace")]
        assert workers, f"no RayTrainWorker ran on Ray node {idx} ({node})"
    print(f"job {job}: {time.monotonic() - t0:.0f} s")
