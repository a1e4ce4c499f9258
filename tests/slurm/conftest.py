"""A real Slurm cluster on this machine for the cluster-launch tests.

Session fixture ``slurm``: installs Debian's ``slurmctld slurmd slurm-client munge`` if they are
missing (root + apt-get; otherwise the tests are skipped with the reason), writes a
``slurm.conf`` into a temporary directory and starts, in the foreground so their PIDs are
known: ``munged`` (own key and socket), ``slurmctld`` and two ``slurmd`` (``-N``): node 1 is this
host's short hostname, node 2 an emulated second node on the same host, each with 2 CPUs,
``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``. Everything lives in the temporary
directory (spool, state, logs, pid files) and on free ports, so it never touches a system
Slurm. At teardown every job is cancelled and the daemons are stopped by PID.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain.sh"
TINY_CONFIG = REPO / "configs" / "pretrain" / "tiny.yaml"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "munged"]


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _ensure_slurm_installed() -> None:
    """apt-get install the Debian packages if a binary is missing; skip with the reason if not possible."""
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"Slurm tests need root to install {' '.join(PACKAGES)} and run slurmd (missing: {_missing()})")
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed (missing {_missing()}) and there is no apt-get to install {PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` timed out; cannot install Slurm")
        if r.returncode != 0:
            pytest.skip(f"cannot install Slurm: `{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}")
    if _missing():
        pytest.skip(f"Slurm binaries still missing after apt-get install: {_missing()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(size: int, lo: int = 20000, hi: int = 32000) -> int:
    """A base port with ``size`` consecutive ports free on this host (for Ray's per-job block)."""
    for _ in range(200):
        base = random.randrange(lo, hi - size)
        socks = []
        try:
            for p in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {size} free ports in [{lo}, {hi})")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: list[str]
    ray_tmp: Path
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands and jobs (sbatch exports it into the job)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[k]
        env.pop("RAY_ADDRESS", None)
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        r = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(2)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} did not reach {states} within {timeout}s: {self.job(job_id)}")

    def cancel_all(self, timeout: float = 90) -> None:
        self.run("scancel", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", check=False).stdout.strip():
                return
            time.sleep(1)


def _write_conf(root: Path, host: str, nodes: list[str]) -> Path:
    ctl_port, *node_ports = (free_port() for _ in range(1 + len(nodes)))
    for d in ("spool", "state", "log", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=1000 State=UNKNOWN"
        for n, p in zip(nodes, node_ports)
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# one-host test cluster written by tests/slurm/conftest.py
ClusterName=timemaetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
FirstJobId={random.randrange(1000, 900000)}
MinJobAge=600
KillWait=30
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool/%n
StateSaveLocation={root}/state
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _stop(pid: int, timeout: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.fixture(scope="session")
def slurm():
    _ensure_slurm_installed()
    host = socket.gethostname().split(".")[0]
    nodes = [host, f"{host}n2"]
    root = Path(tempfile.mkdtemp(prefix="timemae-slurm-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="tmray", dir="/tmp"))  # short: Ray's sockets live below
    conf = _write_conf(root, host, nodes)
    cluster = SlurmCluster(root, conf, nodes, ray_tmp)
    procs: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(root / "log" / f"{name}.console", "w")
        p = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        procs.append((name, p))
        cluster.pids[name] = p.pid

    try:
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        start("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                         f"--socket={root}/munge/munge.sock", f"--pid-file={root}/munge/munged.pid",
                         f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"])
        deadline = time.monotonic() + 20
        while not (root / "munge" / "munge.sock").exists():
            assert time.monotonic() < deadline, f"munged did not start: {(root / 'munge' / 'munged.log').read_text()}"
            time.sleep(0.2)
        start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        for n in nodes:
            (root / "spool" / n).mkdir(parents=True, exist_ok=True)
            start(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(conf)])
        deadline = time.monotonic() + 90
        while True:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(nodes) and all(s == "idle" for s in states.values()):
                break
            for name, p in procs:
                assert p.poll() is None, f"{name} exited: {(root / 'log' / f'{name}.console').read_text()[-2000:]}"
            if time.monotonic() > deadline:
                logs = "\n".join(f.read_text()[-1500:] for f in sorted((root / "log").glob("*.log")))
                raise AssertionError(f"Slurm nodes not idle after 90 s: {states}\n{logs}")
            time.sleep(1)
        yield cluster
    finally:
        if any(n == "slurmctld" for n, _ in procs):
            cluster.cancel_all()
        for name, p in reversed(procs):
            _stop(p.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if os.environ.get("TIMEMAE_KEEP_SLURM_DIR"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    from tests.timemae_dist.train.conftest import write_store

    return write_store(tmp_path_factory.mktemp("slurm-store") / "tiny")


def job_output(cluster: SlurmCluster, job_id: int, info: dict) -> str:
    path = Path(info["StdOut"])
    return path.read_text() if path.exists() else f"<no output file {path}>"
