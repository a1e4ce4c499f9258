"""`ray job submit --working-dir . -- python -m launch.pretrain ...` against a real head node.

The head runs as ``ray start --head --block`` on 127.0.0.1 in a child process; stopping that
process (by its PID) stops exactly this cluster. (``ray stop`` would kill every Ray on the host,
including other sessions' clusters.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # includes HTTPError (e.g. 401 while the dashboard starts)
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture()
def head_node():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # A throwaway loopback cluster: no token auth (Ray >= 2.5x enables it by default).
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_DISABLE_USAGE_STATS="1", RAY_AUTH_MODE="disabled")
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    # Processes of this head that look a cluster up by "auto" must find this one, not another
    # Ray running on the host (e.g. the tests' embedded one).
    head_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--temp-dir", temp, "--disable-usage-stats",
         # fixed default ports (e.g. the agent's 52365) would collide with another Ray on the host
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--ray-client-server-port", str(_free_port())],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down the cluster it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_tiny_run(head_node, tiny_store, tmp_path):
    address, env = head_node
    storage = tmp_path / "runs"
    cmd = (
        [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--working-dir", str(REPO),
         "--", "python", "-m", "launch.pretrain", "configs/pretrain/tiny.yaml", f"data.store={tiny_store}",
         f"run.storage_path={storage}", "run.name=job", "trainer.num_workers=2", "deepspeed.zero_stage=2",
         "trainer.max_steps=4", "run.checkpoint_every=2", "run.log_every=2",
         "trainer.cpu_dropout=off", "trainer.cpu_fused=off"]
    )
    deadline = time.time() + 120
    while True:  # the head's job agent may still be starting even though the dashboard answers
        submit = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(address)
    deadline, status = time.time() + 300, None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-3000:]}"
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert summary["steps"] == 4 and Path(summary["checkpoint"]).name == "checkpoint_0000004"
    assert "cluster" in logs  # joined the running cluster instead of starting a local Ray
    from timemae_dist.mkl_avx512 import support

    if support().applies:  # AMD + AVX-512: the job's workers start with MKL's AVX-512 kernels preloaded
        assert "rank 0: fp32 GEMM: oneMKL AVX-512 path" in logs, logs[-3000:]
    # trainer.cpu_dropout reaches the job's workers (through the runtime env, like LD_PRELOAD)
    assert "rank 0: dropout masks: eager torch ops (TIMEMAE_CPU_DROPOUT=off)" in logs, logs[-3000:]
    assert "rank 0: fused CPU kernels (attention core, residual LayerNorm, GELU, codeword draw): eager torch ops (TIMEMAE_CPU_FUSED=off)" in logs, \
        logs[-3000:]
    assert (storage / "job" / "checkpoint_0000004" / "meta.json").is_file()
    assert list((storage / "job" / "tb").glob("events.out.tfevents.*"))
