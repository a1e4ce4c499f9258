"""A/B of the pretraining step: dropout masks or the fused attention + residual kernels (C vs
eager, in one process), each block as one fused autograd node vs op by op (``--ab block``), malloc (glibc malloc on transparent huge pages vs its defaults, in alternated processes)
or threads (2 intra-op threads on the whole batch vs 2 Python threads on half batches, in one
process).

Whole-run benchmarks (bench_pretrain.py) on a shared 2-core VM vary by 10-20 % from one run to
the next, more than many single optimisations gain. This one builds the official-size model on
the HAPT-HAR store once (d_model 64, 8 layers, batch 128, fp32; plain fused AdamW + the EMA
update, as `timemae pretrain --single-process` runs it) and alternates the two arms in blocks of
``--block`` steps on the same batches, so both see the same machine state; it reports the median
ms/step of each arm's blocks and, since the machine's speed drifts within a run, the median over
rounds of the paired ratio eager / c_kernel (``speedup``).

    python benchmarks/bench_step_ab.py [--ab dropout|fused|block|malloc|threads|raybg] [--store stores/hapt_har] [--threads 2]
        [--rounds 10] [--block 15] [--fresh] [--json]

``--ab malloc`` measures an idea that did not pay off: a step allocates and frees a few hundred
activation tensors, and with glibc's defaults the heap shrinks after a step and regrows in the next
(~2,000 minor page faults per step). ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge
pages for malloc's memory, glibc >= 2.35) plus a 32 MiB mmap and 512 MiB trim threshold remove the
faults, but not step time. glibc reads the tunables only when a process starts, so each round runs
two fresh child processes, one with them and one without (the order alternating), each timing ``--block`` x 3 steps after 5 warm-up steps and counting its
minor page faults over them; the result is the median over rounds of the paired ratio
default / huge-pages (``speedup``).

``--ab raybg`` measures what a Ray Train run's own processes cost a compute-bound step on a small
machine: the same step, timed in blocks with and without an idle Ray Train job in the background (a
child process starts the embedded local Ray that ``timemae pretrain`` starts and a ``TorchTrainer``
whose one worker, sized like bench_pretrain's one-worker row, sleeps until told to stop; Ray's raylet,
GCS, dashboard, agents and Train's controller and helper actors run as in a real run). Three arms per
round, the order alternating: ``quiet`` (no Ray), ``ray_train`` (the embedded Ray with Ray's defaults,
``TIMEMAE_LEAN_LOCAL_RAY=0``) and ``ray_lean`` (as ``timemae`` starts it: no idle workers kept, no
preemption watcher). A Ray arm starts the background, waits until its worker runs and 10 s more (the
controller and helper actors are all polling by then), times one block, then stops it. While the block
runs it counts, from /proc, the other processes' CPU time and their threads' context switches
(wake-ups) per second. Results: the medians over rounds of the paired ratios ray_train / quiet
(``slowdown``) and ray_lean / quiet (``lean_slowdown``). The timed step runs at nice 0 in this process
(``--fresh``: in a new process per block, started beside the background as a Ray worker is), not in a
Ray worker, so what it measures is the background alone.

``--ab threads`` measures another idea that did not pay off: a second intra-op thread adds little
to one process's step (tiny GEMMs, much element-wise work), so each step's batch is split in two
halves whose forward + backward run in two Python threads at once with 1 intra-op thread each
(autograd accumulates both halves' gradients; each half's loss is halved), then one optimizer
step. The threads contend for the GIL between the step's ~thousand small ops, and the split arm
was slower. The result is the median over rounds of the paired ratio halves / intra-op
(``speedup``: above 1 means the intra-op arm, what the trainer does, is faster).

Run it as `timemae`'s own processes run (oneMKL's AVX-512 kernels on AMD CPUs):
``LD_PRELOAD=$(python -m timemae_dist.mkl_avx512 --build | tail -1) python benchmarks/bench_step_ab.py``
or without the shim for MKL's default dispatch; the JSON records which (``gemm``).
``--ab fused`` switches ``TIMEMAE_CPU_FUSED`` (the fused attention core and post-LN residual of
timemae_dist/kernels/cpu_fused.py) the same way ``--ab dropout`` switches ``TIMEMAE_CPU_DROPOUT``.
``--ab block`` keeps the fused kernels in both arms and switches
timemae_dist/kernels/cpu_block.py (one autograd node per encoder/regressor block, biases folded
into the kernels) off with ``cpu_block.disabled()``; its JSON: {"block_ms": ..., "per_op_ms": ...,
"speedup": ..., "ratios": [...], "windows_per_s": {...}, "cpu": {...}, "gemm": "..."}.
Last line with --json (dropout, fused): {"kernel": ..., "c_kernel_ms": ..., "eager_ms": ..., "speedup": ..., "ratios": [...], "windows_per_s":
{"c_kernel": ..., "eager": ...}, "cpu": {...}, "gemm": "..."}; with --ab malloc {"thp_ms": ...,
"default_ms": ..., "speedup": ..., "ratios": [...], "faults_per_step": {"thp": ..., "default": ...},
"cpu": {...}, "gemm": "..."}; with --ab threads {"intra_op_ms": ..., "halves_ms": ..., "speedup": ...,
"ratios": [...], "cpu": {...}, "gemm": "..."}; with --ab raybg {"quiet_ms": ..., "ray_train_ms": ...,
"ray_lean_ms": ..., "slowdown": ..., "ratios": [...], "lean_slowdown": ..., "lean_ratios": [...],
"background": {"ray_train": {"cpu_percent": ..., "wakeups_per_s": ..., "processes": ...}, "ray_lean": {...}},
"fresh": bool, "cpu": {...}, "gemm": "..."}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912"


def _setup(args, flat_params: bool = True):
    """The official-size model, its plain engine, ``block`` batches of the store, and two step functions:
    the trainer's and the same step on two half-batch threads (``--ab threads``)."""
    import torch

    from timemae_dist.train.build import build_loader, build_model
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.preflight import resolve
    from timemae_dist.train.trainer import EmaUpdate, PlainEngine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_pretrain_config(REPO / "configs" / "pretrain" / "har.yaml",
                                   [f"data.store={args.store}", f"run.storage_path={tmp}", "run.name=ab",
                                    f"trainer.flat_params={str(flat_params).lower()}"])
        cfg, _ = resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    target = model.detach_target_encoder()
    engine = PlainEngine(model, cfg, 10_000)
    it = iter(build_loader(cfg, 0, 1))
    batches = [next(it)["x"] for _ in range(args.block)]
    ema = EmaUpdate(target, model.encoder, cfg.model.momentum)  # as the trainer does it

    def step(x):
        out = engine(x, target_encoder=target)
        engine.backward(out["loss"])
        engine.step()
        ema()

    def half_step(x):
        """The same step with the batch split over two Python threads (``--ab threads``)."""
        import threading

        errors: list[BaseException] = []

        def work(x_half):
            try:
                engine.backward(engine(x_half, target_encoder=target)["loss"] * 0.5)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(h,)) for h in x.chunk(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        engine.step()
        ema()

    return cfg, batches, step, half_step


def _child(args) -> int:
    """One process of the malloc A/B: 5 warm-up steps, then 3 x block timed steps."""
    import resource

    _cfg, batches, step, _ = _setup(args)
    for x in batches[:5]:
        step(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(3):
        for x in batches:
            step(x)
    n = 3 * len(batches)
    ms = (time.perf_counter() - t0) / n * 1e3
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
    print(json.dumps({"ms": ms, "faults_per_step": faults}))
    return 0


def _run_child(args, env: dict[str, str], arm: str) -> dict:
    """Run :func:`_child` in a new process with ``env``; its JSON result (``ms``, ``faults_per_step``)."""
    import subprocess

    cmd = [sys.executable, __file__, "--child", "--store", args.store, "--threads", str(args.threads),
           "--block", str(args.block)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"bench_step_ab child ({arm}) failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _malloc_ab(args) -> int:
    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.mkl_avx512 import describe

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().strip() if thp.is_file() else "unavailable"
    if sys.platform != "linux" or "[never]" in mode or mode == "unavailable":
        raise SystemExit(f"bench_step_ab --ab malloc: needs Linux with transparent huge pages (THP: {mode})")
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    envs = {"thp": {**base, "GLIBC_TUNABLES": TUNABLES}, "default": base}
    note = f"GLIBC_TUNABLES={TUNABLES} (THP {mode})"
    ms: dict[str, list[float]] = {a: [] for a in envs}
    faults: dict[str, list[float]] = {a: [] for a in envs}
    for r in range(args.rounds):
        for a in (("thp", "default") if r % 2 == 0 else ("default", "thp")):
            res = _run_child(args, envs[a], a)
            ms[a].append(res["ms"])
            faults[a].append(res["faults_per_step"])
    ratios = [d / t for d, t in zip(ms["default"], ms["thp"])]
    speedup = statistics.median(ratios)
    med = {a: statistics.median(v) for a, v in ms.items()}
    fps = {a: statistics.median(v) for a, v in faults.items()}
    print(f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}; {note}")
    print(f"{'arm':<10}{'median ms/step':>16}{'faults/step':>13}  processes (ms/step)")
    for a in envs:
        print(f"{a:<10}{med[a]:>16.1f}{fps[a]:>13,.0f}  {' '.join(f'{v:.1f}' for v in ms[a])}")
    print(f"default / thp per round: median {speedup:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{args.rounds} rounds, {3 * args.block} timed steps per process)")
    if args.json:
        print(json.dumps({"thp_ms": med["thp"], "default_ms": med["default"], "speedup": speedup, "ratios": ratios,
                          "faults_per_step": fps, "processes_ms": ms, "cpu": cpu_info(), "gemm": describe()}))
    return 0


def _alternate(arms, batches, rounds: int) -> dict[str, list[float]]:
    """ms/step of each arm's blocks: ``arms`` maps a name to ``enter()`` -> the step function to time
    (``enter`` applies the arm's setting). Both arms warm up first; then each round times one block per
    arm on the same batches, the order alternating, one untimed step after each switch."""
    ms: dict[str, list[float]] = {a: [] for a in arms}
    for enter in arms.values():
        fn = enter()
        for x in batches[:5]:
            fn(x)
    for r in range(rounds):
        for a in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            ms[a].append(_time_block(arms[a](), batches))
    return ms


def _time_block(fn, batches) -> float:
    """ms per step of ``fn`` over ``batches``, after one untimed step."""
    fn(batches[0])
    t0 = time.perf_counter()
    for x in batches:
        fn(x)
    return (time.perf_counter() - t0) / len(batches) * 1e3


def _paired(ms: dict[str, list[float]], slow: str, fast: str) -> tuple[float, list[float]]:
    """The machine's speed drifts over a run: each round's ``slow / fast`` ratio of its two blocks, and their median."""
    ratios = [s_ / f_ for s_, f_ in zip(ms[slow], ms[fast])]
    return statistics.median(ratios), ratios


def _report(ms: dict[str, list[float]], bs: int, header: str, slow: str, fast: str, args) -> tuple[float, list[float]]:
    """Print the per-arm table and the median paired ratio ``slow / fast`` over rounds; returns it and the ratios."""
    med = {a: statistics.median(v) for a, v in ms.items()}
    print(header)
    print(f"{'arm':<10}{'median ms/step':>16}{'windows/s':>11}  blocks (ms/step)")
    for a in ms:
        print(f"{a:<10}{med[a]:>16.1f}{bs / med[a] * 1e3:>11,.0f}  {' '.join(f'{v:.1f}' for v in ms[a])}")
    speedup, ratios = _paired(ms, slow, fast)
    print(f"{slow} / {fast} per round: median {speedup:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{args.rounds} rounds of {args.block} steps, batch {bs})")
    return speedup, ratios


def _threads_ab(args) -> int:
    import torch

    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.mkl_avx512 import describe

    cfg, batches, step, half_step = _setup(args)

    def arm(threads, fn):
        def enter():
            torch.set_num_threads(threads)
            return fn
        return enter

    try:
        ms = _alternate({"intra_op": arm(args.threads, step), "halves": arm(1, half_step)}, batches, args.rounds)
    finally:
        torch.set_num_threads(args.threads)
    med = {a: statistics.median(v) for a, v in ms.items()}
    header = f"CPU: {describe_cpu()}; {describe()}; intra_op: {args.threads} torch threads, halves: 2 Python threads x 1"
    speedup, ratios = _report(ms, cfg.trainer.micro_batch_size, header, "halves", "intra_op", args)
    if args.json:
        print(json.dumps({"intra_op_ms": med["intra_op"], "halves_ms": med["halves"], "speedup": speedup,
                          "ratios": ratios, "blocks_ms": ms, "cpu": cpu_info(), "gemm": describe()}))
    return 0


def _block_ab(args) -> int:
    """``--ab block``: each block as one fused autograd node (timemae_dist/kernels/cpu_block.py) vs op by
    op on the same fused kernels (``cpu_block.disabled()``). ``--ab onecall``: the node as one C call each
    way vs the node calling torch's GEMMs and the kernels one by one (``cpu_block.torch_gemms()``).
    Switched between blocks of steps."""
    import contextlib

    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.kernels import cpu_block, cpu_fused
    from timemae_dist.mkl_avx512 import describe

    cpu_fused.KERNEL.available("on")
    onecall = args.ab == "onecall"
    if onecall and not cpu_block.one_call_status()[0]:
        raise SystemExit(f"bench_step_ab --ab onecall: {cpu_block.one_call_status()[1]}")
    fast, slow = ("one_call", "torch_gemms") if onecall else ("block", "per_op")
    cfg, batches, step, _ = _setup(args)
    with contextlib.ExitStack() as stack:
        def arm(off):
            def enter():
                stack.close()
                if off:
                    stack.enter_context(cpu_block.torch_gemms() if onecall else cpu_block.disabled())
                return step
            return enter

        ms = _alternate({fast: arm(False), slow: arm(True)}, batches, args.rounds)
        stack.close()
    med = {a: statistics.median(v) for a, v in ms.items()}
    bs = cfg.trainer.micro_batch_size
    what = "one C call per block vs torch's GEMMs from Python" if onecall else "one node per block vs op by op"
    header = f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}; {what}"
    speedup, ratios = _report(ms, bs, header, slow, fast, args)
    if args.json:
        print(json.dumps({f"{fast}_ms": med[fast], f"{slow}_ms": med[slow], "speedup": speedup, "ratios": ratios,
                          "windows_per_s": {a: bs / med[a] * 1e3 for a in ms}, "blocks_ms": ms, "cpu": cpu_info(),
                          "gemm": describe()}))
    return 0


def _flat_ab(args) -> int:
    """The optimizer step, gradient clip and EMA on one flat parameter buffer (trainer.flat_params,
    timemae_dist/train/flat.py) vs per parameter tensor: two models built from the same seed, one
    per layout, their blocks of steps alternated on the same batches."""
    import torch

    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.mkl_avx512 import describe

    cfg, batches, step_flat, _ = _setup(args, flat_params=True)
    _cfg, _batches, step_per_tensor, _ = _setup(args, flat_params=False)

    def arm(fn):
        return lambda: fn

    ms = _alternate({"flat": arm(step_flat), "per_tensor": arm(step_per_tensor)}, batches, args.rounds)
    med = {a: statistics.median(v) for a, v in ms.items()}
    bs = cfg.trainer.micro_batch_size
    header = (f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}; "
              f"optimizer + clip + EMA on one flat buffer vs per tensor ({torch.__version__})")
    speedup, ratios = _report(ms, bs, header, "per_tensor", "flat", args)
    if args.json:
        print(json.dumps({"flat_ms": med["flat"], "per_tensor_ms": med["per_tensor"], "speedup": speedup,
                          "ratios": ratios, "windows_per_s": {a: bs / med[a] * 1e3 for a in ms}, "blocks_ms": ms,
                          "cpu": cpu_info(), "gemm": describe()}))
    return 0


def _ray_background(stop_file: str, ready_file: str) -> int:
    """Child of ``--ab raybg``: the embedded local Ray that ``timemae pretrain`` starts
    (``timemae_dist.train.driver.connect_ray``; ``$TIMEMAE_LEAN_LOCAL_RAY`` as the parent set it) and an
    idle one-worker Ray Train job until ``stop_file`` exists (the worker writes ``ready_file`` once it runs)."""
    import tempfile as tf

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.driver import connect_ray

    def idle_worker(cfg):
        import os as _os
        import time as _time

        Path(cfg["ready"]).write_text(str(_os.getpid()))
        while not _os.path.exists(cfg["stop"]):  # 5 wake-ups/s: negligible next to Ray's own
            _time.sleep(0.2)

    with tf.TemporaryDirectory(prefix="bench-raybg-") as storage:
        connect_ray(load_pretrain_config(REPO / "configs" / "pretrain" / "har.yaml", [f"run.storage_path={storage}"]))
        TorchTrainer(idle_worker, train_loop_config={"stop": stop_file, "ready": ready_file},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                     run_config=RunConfig(storage_path=storage, name="idle")).fit()
        ray.shutdown()
    return 0


def _proc_counters(skip: int) -> dict[int, tuple[int, int]]:
    """Per process (but ``skip``): (CPU ticks, context switches of all its threads) from /proc."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == skip:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
            out[int(pid)] = (int(fields[11]) + int(fields[12]), switches)
        except (OSError, ValueError, IndexError):  # a process or thread that ended meanwhile
            continue
    return out


def _raybg_ab(args) -> int:
    import subprocess

    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.mkl_avx512 import describe
    from timemae_dist.train.driver import LEAN_ENV

    cfg, batches, step, _ = _setup(args)
    for x in batches[:5]:
        step(x)
    ticks = os.sysconf("SC_CLK_TCK")

    arms = {"quiet": None, "ray_train": "0", "ray_lean": "1"}  # $TIMEMAE_LEAN_LOCAL_RAY of the background
    ms: dict[str, list[float]] = {a: [] for a in arms}
    bg: dict[str, dict[str, list[float]]] = {a: {"cpu_percent": [], "wakeups_per_s": [], "processes": []}
                                             for a in arms if arms[a] is not None}

    def block(arm: str) -> float:
        if args.fresh:  # a new process, started (and building its model) beside the background
            return _run_child(args, dict(os.environ), arm)["ms"]
        return _time_block(step, batches)

    with tempfile.TemporaryDirectory(prefix="bench-raybg-") as tmp:
        for r in range(args.rounds):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                if arms[arm] is None:
                    ms[arm].append(block(arm))
                    continue
                stop, ready = Path(tmp, f"stop-{arm}-{r}"), Path(tmp, f"ready-{arm}-{r}")
                child = subprocess.Popen([sys.executable, __file__, "--ray-background", str(stop), str(ready)],
                                         env={**os.environ, LEAN_ENV: arms[arm]},
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    deadline = time.time() + 180
                    while not ready.exists():
                        if child.poll() is not None or time.time() > deadline:
                            raise SystemExit("bench_step_ab --ab raybg: the background Ray Train job did not start "
                                             f"(exit {child.poll()}); run it alone to see why: python {__file__} "
                                             f"--ray-background {stop} {ready}")
                        time.sleep(0.5)
                    time.sleep(10)  # Ray Train's controller and helper actors are all up and polling by then
                    before, t0 = _proc_counters(os.getpid()), time.perf_counter()
                    ms[arm].append(block(arm))
                    after, dt = _proc_counters(os.getpid()), time.perf_counter() - t0
                    both = [p for p in after if p in before]  # (a --fresh child is in neither)
                    bg[arm]["cpu_percent"].append(sum(after[p][0] - before[p][0] for p in both) / ticks / dt * 100)
                    bg[arm]["wakeups_per_s"].append(sum(after[p][1] - before[p][1] for p in both) / dt)
                    bg[arm]["processes"].append(sum(1 for p in both if after[p][1] > before[p][1]))
                finally:
                    stop.touch()
                    child.wait(timeout=120)
    bs = cfg.trainer.micro_batch_size
    header = (f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}; the step "
              f"{'in a new process per block' if args.fresh else 'in this process'} with vs without an idle "
              f"one-worker Ray Train job in the background (ray_train: the embedded Ray as it was, "
              f"{LEAN_ENV}=0; ray_lean: as timemae starts it now)")
    slowdown, ratios = _report(ms, bs, header, "ray_train", "quiet", args)
    lean, lean_ratios = _paired(ms, "ray_lean", "quiet")
    print(f"ray_lean / quiet per round: median {lean:.3f} (range {min(lean_ratios):.3f}-{max(lean_ratios):.3f})")
    background = {a: {k: statistics.median(v) for k, v in d.items()} for a, d in bg.items()}
    for a, d in background.items():
        print(f"{a}: all other processes together {d['cpu_percent']:.1f} % of one CPU, {d['wakeups_per_s']:,.0f} "
              f"wake-ups/s in {d['processes']:.0f} processes (medians over rounds; a quiet machine: a few dozen)")
    if args.json:
        med = {a: statistics.median(v) for a, v in ms.items()}
        print(json.dumps({"quiet_ms": med["quiet"], "ray_train_ms": med["ray_train"], "ray_lean_ms": med["ray_lean"],
                          "slowdown": slowdown, "ratios": ratios, "lean_slowdown": lean, "lean_ratios": lean_ratios,
                          "blocks_ms": ms, "background": background, "fresh": args.fresh, "cpu": cpu_info(),
                          "gemm": describe()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ab", choices=("dropout", "fused", "block", "onecall", "flat", "malloc", "threads", "raybg"),
                   default="dropout")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ray-background", nargs=2, metavar=("STOP", "READY"), help=argparse.SUPPRESS)
    p.add_argument("--store", default=str(REPO / "stores" / "hapt_har"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=15)
    p.add_argument("--fresh", action="store_true",
                   help="--ab raybg: time each block in a new process (as a Ray worker is one), not in this one")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.ray_background:
        return _ray_background(*args.ray_background)
    if args.ab == "raybg":
        return _raybg_ab(args)
    if args.ab == "malloc":
        return _malloc_ab(args)
    if args.ab == "threads":
        return _threads_ab(args)
    if args.ab in ("block", "onecall"):
        return _block_ab(args)
    if args.ab == "flat":
        return _flat_ab(args)

    return _kernel_ab(args)


def _kernel_ab(args) -> int:
    """A C kernel (``--ab dropout``: the dropout masks; ``--ab fused``: the fused attention core and residual)
    on vs off, switched through its environment variable between blocks."""
    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.kernels import cpu_dropout, cpu_fused
    from timemae_dist.mkl_avx512 import describe

    kernel = (cpu_fused if args.ab == "fused" else cpu_dropout).KERNEL
    kernel.available("on")  # build/load before timing; fails clearly where it cannot
    cfg, batches, step, _ = _setup(args)

    def arm(mode):
        def enter():
            os.environ[kernel.env] = mode
            return step
        return enter

    with cpu_dropout.env_restored():
        ms = _alternate({"c_kernel": arm("on"), "eager": arm("off")}, batches, args.rounds)
    med = {a: statistics.median(v) for a, v in ms.items()}
    bs = cfg.trainer.micro_batch_size
    header = f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}; {kernel.env}=on vs off"
    speedup, ratios = _report(ms, bs, header, "eager", "c_kernel", args)
    if args.json:
        print(json.dumps({"kernel": args.ab, "c_kernel_ms": med["c_kernel"], "eager_ms": med["eager"],
                          "speedup": speedup, "ratios": ratios, "windows_per_s": {a: bs / med[a] * 1e3 for a in ms},
                          "blocks_ms": ms, "cpu": cpu_info(), "gemm": describe()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
