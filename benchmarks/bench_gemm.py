"""fp32 GEMM GFLOP/s on CPU: oneMKL's default dispatch vs its AVX-512 kernels on an AMD CPU.

PyTorch's oneMKL runs its AVX2 kernels on AMD CPUs even where they have AVX-512
(timemae_dist/mkl_avx512.py). Each column is a fresh process (the override must be loaded at
process start): ``default`` without it, ``avx512`` with the preload library. Shapes are the ones
TimeMAE's official size trains with (896 = 128 windows x 7 visible tokens; d_model 64, FFN 256),
their backward (K = 896) and one large square GEMM; ``F.linear`` as ``nn.Linear`` calls it.

    python benchmarks/bench_gemm.py [--threads 1] [--json]

The last line with --json: {"default": {shape: GFLOP/s}, "avx512": {shape: GFLOP/s}, "cpu": {...}}
(``cpu``: timemae_dist.hostinfo.cpu_info, the CPU generation matters: ~2x on Zen 5, ~1.1x on Zen 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [(896, 64, 64), (896, 64, 192), (896, 64, 256), (896, 256, 64), (64, 896, 256), (1024, 1024, 1024)]

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for n, k, m in json.loads(sys.argv[2]):
    x, w = torch.randn(n, k), torch.randn(m, k)
    flops = 2 * n * k * m
    reps = max(20, int(4e9 / flops))
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(5):  # best of 5 timed blocks: the figure the machine can sustain
        t = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t) / reps)
    out[f"{n}x{k}x{m}"] = flops / best / 1e9
print(json.dumps(out))
"""


def measure(env: dict[str, str], threads: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads), json.dumps(SHAPES)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from timemae_dist.hostinfo import cpu_info, describe_cpu
    from timemae_dist.mkl_avx512 import support, worker_env

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TIMEMAE_MKL_AVX512_REEXEC")}
    result = {"default": measure(base, args.threads)}
    sup = support()
    if sup.applies:
        env, note = worker_env("on")
        result["avx512"] = measure({**base, **env}, args.threads)
    else:
        note = f"override not applicable: {sup.reason}"
    print(f"CPU: {describe_cpu()}")
    print(f"fp32 F.linear GFLOP/s, {args.threads} thread(s); {note}")
    print(f"{'N x K x M':<18}{'default':>10}" + (f"{'avx512':>10}{'ratio':>8}" if "avx512" in result else ""))
    for shape, gf in result["default"].items():
        row = f"{shape:<18}{gf:>10.1f}"
        if "avx512" in result:
            row += f"{result['avx512'][shape]:>10.1f}{result['avx512'][shape] / gf:>8.2f}"
        print(row)
    if args.json:
        print(json.dumps({**result, "cpu": cpu_info()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
