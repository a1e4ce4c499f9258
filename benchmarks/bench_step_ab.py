"""A/B of one pretraining step in ONE process: dropout masks from the C kernel vs torch's eager ops.

Whole-run benchmarks (bench_pretrain.py) on a shared 2-core VM vary by 10-20 % from one run to
the next, more than many single optimisations gain. This one builds the official-size model on
the HAPT-HAR store once (d_model 64, 8 layers, batch 128, fp32; plain fused AdamW + the EMA
update, as `timemae pretrain --single-process` runs it) and alternates the two arms in blocks of
``--block`` steps on the same batches, so both see the same machine state; it reports the median
ms/step of each arm's blocks and, since the machine's speed drifts within a run, the median over
rounds of the paired ratio eager / c_kernel (``speedup``).

    python benchmarks/bench_step_ab.py [--store stores/hapt_har] [--threads 2] [--rounds 10]
        [--block 15] [--json]

Run it as `timemae`'s own processes run (oneMKL's AVX-512 kernels on AMD CPUs):
``LD_PRELOAD=$(python -m timemae_dist.mkl_avx512 --build | tail -1) python benchmarks/bench_step_ab.py``
or without the shim for MKL's default dispatch; the JSON records which (``gemm``).
Last line with --json: {"c_kernel_ms": ..., "eager_ms": ..., "speedup": ..., "ratios": [...], "windows_per_s":
{"c_kernel": ..., "eager": ...}, "cpu": {...}, "gemm": "..."}.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "stores" / "hapt_har"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.kernels import cpu_dropout
    from timemae_dist.mkl_avx512 import describe
    from timemae_dist.model import TimeMAE
    from timemae_dist.train.build import build_loader, build_model
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.preflight import resolve
    from timemae_dist.train.trainer import PlainEngine

    torch.set_num_threads(args.threads)
    cpu_dropout.available("on")  # build/load before timing; fails clearly where it cannot
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_pretrain_config(REPO / "configs" / "pretrain" / "har.yaml",
                                   [f"data.store={args.store}", f"run.storage_path={tmp}", "run.name=ab"])
        cfg, _ = resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    target = model.detach_target_encoder()
    engine = PlainEngine(model, cfg, 10_000)
    it = iter(build_loader(cfg, 0, 1))
    batches = [next(it)["x"] for _ in range(args.block)]
    momentum = cfg.model.momentum
    online = list(model.encoder.parameters())

    def step(x):
        out = engine(x, target_encoder=target)
        engine.backward(out["loss"])
        engine.step()
        with torch.no_grad():
            TimeMAE.momentum_update_(target, online, momentum)

    arms = {"c_kernel": "on", "eager": "off"}
    saved = os.environ.get("TIMEMAE_CPU_DROPOUT")
    ms: dict[str, list[float]] = {a: [] for a in arms}
    try:
        for a in arms:  # warm-up both arms
            os.environ["TIMEMAE_CPU_DROPOUT"] = arms[a]
            for x in batches[:5]:
                step(x)
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for a in order:
                os.environ["TIMEMAE_CPU_DROPOUT"] = arms[a]
                step(batches[0])  # one untimed step after the switch
                t0 = time.perf_counter()
                for x in batches:
                    step(x)
                ms[a].append((time.perf_counter() - t0) / len(batches) * 1e3)
    finally:
        if saved is None:
            os.environ.pop("TIMEMAE_CPU_DROPOUT", None)
        else:
            os.environ["TIMEMAE_CPU_DROPOUT"] = saved
    med = {a: statistics.median(v) for a, v in ms.items()}
    bs = cfg.trainer.micro_batch_size
    print(f"CPU: {describe_cpu()}; {describe()}; torch threads {args.threads}")
    print(f"{'arm':<10}{'median ms/step':>16}{'windows/s':>11}  blocks (ms/step)")
    for a in arms:
        print(f"{a:<10}{med[a]:>16.1f}{bs / med[a] * 1e3:>11,.0f}  {' '.join(f'{v:.1f}' for v in ms[a])}")
    # the machine's speed drifts over a run: pair each round's two blocks and take the median ratio
    ratios = [e / c for e, c in zip(ms["eager"], ms["c_kernel"])]
    speedup = statistics.median(ratios)
    print(f"eager / c_kernel per round: median {speedup:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{args.rounds} rounds of {args.block} steps, batch {bs})")
    if args.json:
        print(json.dumps({"c_kernel_ms": med["c_kernel"], "eager_ms": med["eager"], "speedup": speedup, "ratios": ratios,
                          "windows_per_s": {a: bs / med[a] * 1e3 for a in arms}, "blocks_ms": ms,
                          "cpu": cpu_info(), "gemm": describe()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
