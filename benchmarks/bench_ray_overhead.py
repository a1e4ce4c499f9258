"""Where a one-worker Ray Train run loses time to Ray's own processes on a small machine.

Runs the one-worker pretraining of bench_pretrain's first row (HAPT-HAR, official model size, 2
torch threads) twice as a real ``timemae pretrain`` command, through Ray Train and with
``--single-process`` (the same loop without Ray), and samples /proc for ``--window`` seconds once
``--warmup`` steps are logged: the training process's two busiest threads (the training thread and
its OpenMP helper), their CPU and how often they were switched out while runnable (involuntary
context switches: another thread took the CPU) or blocked (voluntary), and every other process on the
machine: CPU and wake-ups (context switches of all their threads) per second, the busiest named.

    python benchmarks/bench_ray_overhead.py [--store stores/hapt_har] [--steps 500] [--warmup 100]
        [--window 10] [--json]

The last line with --json: {"ray_train": {...}, "single_process": {...}} with, per mode,
"training_threads": {"cpu_percent", "involuntary_per_s", "voluntary_per_s"}, "training_process_other":
{"cpu_percent", "wakeups_per_s"}, "other_processes": {"cpu_percent", "wakeups_per_s", "processes",
"top": [[name, wakeups_per_s, cpu_percent], ...]}, "windows_per_s" (the run's summary) plus "cpu".
CPU percents are of one CPU. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _read_thread(pid: int, tid: int) -> tuple[int, int, int] | None:
    """(CPU ticks, voluntary, involuntary context switches) of one thread, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        vol = invol = 0
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol = int(line.split()[1])
        return int(fields[11]) + int(fields[12]), vol, invol
    except (OSError, ValueError, IndexError):
        return None


def _name(pid: int) -> str:
    """A short name: Ray's process titles (``ray::TrainController``), else the program and script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "[kernel]"
    if words[0].startswith("ray::") or words[0].startswith("ray-dashboard-"):
        return words[0].split()[0]
    parts = [Path(words[0]).name] + [Path(w).name for w in words[1:3] if not w.startswith("-")]
    return " ".join(parts)[:60]


def snapshot() -> dict[tuple[int, int], tuple[int, int, int]]:
    """Every thread on the machine: (pid, tid) -> (CPU ticks, voluntary, involuntary switches)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            r = _read_thread(int(pid), int(tid))
            if r is not None:
                out[(int(pid), int(tid))] = r
    return out


def attribute(before: dict, after: dict, names: dict[int, str], seconds: float, training_pid: int,
              skip: set[int]) -> dict:
    """Rates over the window: the training process's two busiest threads, its other threads, and all
    other processes (but ``skip``: this benchmark and its sampling) with the busiest by wake-ups."""
    tick = os.sysconf("SC_CLK_TCK")
    deltas = {k: tuple(a - b for a, b in zip(after[k], before[k])) for k in after if k in before}
    train = sorted(((d, k) for k, d in deltas.items() if k[0] == training_pid), key=lambda x: -x[0][0])
    busiest, rest = train[:2], train[2:]
    per_proc: dict[int, list[float]] = {}  # pid -> [wake-ups, CPU ticks]
    named: dict[str, list[float]] = {}  # the same, summed over processes of one name
    for (pid, _tid), (cpu, vol, invol) in deltas.items():
        if pid == training_pid or pid in skip:
            continue
        for acc in (per_proc.setdefault(pid, [0.0, 0.0]), named.setdefault(names.get(pid, "?"), [0.0, 0.0])):
            acc[0] += vol + invol
            acc[1] += cpu
    top = sorted(named.items(), key=lambda x: -x[1][0])[:8]
    return {
        "training_threads": {
            "cpu_percent": sum(d[0] for d, _ in busiest) / tick / seconds * 100,
            "involuntary_per_s": sum(d[2] for d, _ in busiest) / seconds,
            "voluntary_per_s": sum(d[1] for d, _ in busiest) / seconds,
        },
        "training_process_other": {
            "cpu_percent": sum(d[0] for d, _ in rest) / tick / seconds * 100,
            "wakeups_per_s": sum(d[1] + d[2] for d, _ in rest) / seconds,
        },
        "other_processes": {
            "cpu_percent": sum(c for _, c in per_proc.values()) / tick / seconds * 100,
            "wakeups_per_s": sum(w for w, _ in per_proc.values()) / seconds,
            "processes": sum(1 for w, _ in per_proc.values() if w > 0),
            "top": [[n, w / seconds, c / tick / seconds * 100] for n, (w, c) in top],
        },
    }


def measure(mode: str, args, storage: str) -> dict:
    """One real run (``ray_train`` or ``single_process``), sampled after ``--warmup`` logged steps."""
    timemae = shutil.which("timemae", path=str(Path(sys.executable).parent)) or "timemae"
    name = f"overhead-{mode}"
    cmd = [timemae, "pretrain", *(["--single-process"] if mode == "single_process" else []),
           str(REPO / "configs" / "pretrain" / "har.yaml"), f"data.store={args.store}", f"run.storage_path={storage}",
           f"run.name={name}", f"trainer.max_steps={args.steps}", f"run.log_every={args.warmup}",
           "trainer.num_workers=1", "trainer.cpus_per_worker=2", "deepspeed.zero_stage=0", "run.eval_every=0",
           "run.checkpoint_every=0", "run.max_failures=0"]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)  # the embedded local Ray, as on a laptop
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    warm = threading.Event()
    step_re = re.compile(r"step (\d+)/")

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = step_re.search(line)
            if m and int(m.group(1)) >= args.warmup:
                warm.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not warm.wait(1.0):
            if proc.poll() is not None:
                raise SystemExit(f"bench_ray_overhead: the {mode} run ended before step {args.warmup}:\n"
                                 + "".join(lines[-30:]))
        if mode == "ray_train":
            pid = int((Path(storage) / name / "pids" / "rank_0.pid").read_text())
        else:
            pid = proc.pid  # `timemae` re-executes itself in place (same pid) when it preloads the GEMM shim
        before, t0 = snapshot(), time.perf_counter()
        time.sleep(args.window)
        after, seconds = snapshot(), time.perf_counter() - t0
        names = {pid: _name(pid) for pid in {pid for pid, _ in after}}  # now: some end before the report
        if proc.poll() is not None:
            raise SystemExit(f"bench_ray_overhead: the {mode} run ended inside the sampling window; raise --steps")
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"bench_ray_overhead: the {mode} run failed (exit {proc.returncode}):\n" + "".join(lines[-30:]))
    res = attribute(before, after, names, seconds, pid, {os.getpid()})
    res["windows_per_s"] = json.loads(lines[-1])["windows_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "stores" / "hapt_har"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100, help="logged steps before sampling")
    p.add_argument("--window", type=float, default=10.0, help="seconds sampled")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench_ray_overhead: reads /proc (Linux only)")
    from timemae_dist.hostinfo import cpu_info, describe_cpu

    print(f"CPU: {describe_cpu()}")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-overhead-") as storage:
        for mode in ("ray_train", "single_process"):
            result[mode] = r = measure(mode, args, storage)
            t, o, x = r["training_threads"], r["training_process_other"], r["other_processes"]
            print(f"\n{mode}: {r['windows_per_s']:,.0f} windows/s (whole run)")
            print(f"  training thread + OpenMP helper: {t['cpu_percent']:.0f} % CPU, switched out "
                  f"{t['involuntary_per_s']:,.0f}/s while runnable, {t['voluntary_per_s']:,.0f}/s blocked")
            print(f"  the training process's other threads: {o['cpu_percent']:.1f} % CPU, {o['wakeups_per_s']:,.0f} wake-ups/s")
            print(f"  other processes: {x['cpu_percent']:.1f} % CPU, {x['wakeups_per_s']:,.0f} wake-ups/s in "
                  f"{x['processes']} processes; most wake-ups:")
            for n, w, c in x["top"]:
                print(f"    {w:7,.0f}/s {c:5.1f} %  {n}")
    if args.json:
        print(json.dumps({**result, "cpu": cpu_info()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
