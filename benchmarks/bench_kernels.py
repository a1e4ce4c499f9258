"""Fused masking kernel vs the official eager way: forward+backward time and peak memory.

    python benchmarks/bench_kernels.py [--json] [--shapes har,large] [--iters-large 3] [--dropout] [--fused]

Mask gather, forward + backward, at the HAR shape (B=128, L=16, D=64) and a large shape
(B=1024, L=512, D=768), mask ratio 0.6 (M = int(0.6 * L)), per-sample masking, float32:

* unfused -- the official TimeMAE code: ``x = emb + pos.repeat(B, 1, 1)``,
  ``q = mask_token.repeat(B, L, 1) + pos.repeat(B, 1, 1)``, then index the kept / masked rows.
* fused   -- ``fused_mask_gather``: the Triton kernels on a GPU, the eager torch reference on CPU.

Time: median of ``iters`` forward+backward calls after a warm-up call (CUDA: synchronised).
Peak memory: extra memory above what the inputs already hold, during one forward+backward.
On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU torch
keeps no allocator statistics and ``tracemalloc`` misses torch's C++ allocations, so we replay
one step under ``torch.profiler`` (``profile_memory=True``) and take the peak of its CPU memory
timeline (``torch.profiler._memory_profiler.MemoryProfileTimeline``, the data behind
``export_memory_timeline``): exact tensor bytes, the same quantity as the CUDA figure. If
that private API is missing we fall back to the process's resident-set high-water mark
(``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` so freed blocks leave RSS at once, reset ``VmHWM``
via ``/proc/self/clear_refs``, read ``VmHWM - VmRSS``; Linux + glibc, ~1 MB resolution),
else n/a. Timing never runs under the profiler.

``--dropout`` (CPU) adds the dropout-mask kernel (timemae_dist/kernels/cpu_dropout.py) against
the eager mask (``random_`` + threshold + scale, :func:`timemae_dist.model.layers.keep_mask` with
``TIMEMAE_CPU_DROPOUT=off``) at TimeMAE's activation shapes, p = 0.2: median of 2,000 calls.

``--fused`` (CPU) adds the fused kernels of timemae_dist/kernels/cpu_fused.py against the eager
ops (``TIMEMAE_CPU_FUSED=on|off``) at the HAR shapes, training mode, dropout 0.2, median of 300
calls: one ``MultiHeadAttention`` module (d_model 64, 4 heads, projections included), forward +
backward of the encoder's self-attention (7 windows) and the regressor's cross-attention (9
queries, 7 keys) and the target encoder's no-grad forward (9 windows); one ``ResidualNorm``
(``norm(x + dropout(a * y))``, the feed-forward's merged masks) forward + backward at 7 windows;
GELU on the feed-forward's (1152, 256) hidden activations, forward and forward + backward; the
codeword draw of the forward (``draw_codewords``: argmax of Gumbel-perturbed (1152, 192) logits;
eager: ``rand`` + two ``log`` + ``add`` + ``argmax``).

Prints which path ran, one table, and with ``--json`` a last line JSON object of the figures.
The large CPU case needs ~12 GB of RAM (inputs + the unfused path's 7 GB peak) and takes
~1.5 minutes on 2 idle cores; ``--shapes har`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timemae_dist.kernels import fused_mask_gather  # noqa: E402

SHAPES = {"har": (128, 16, 64), "large": (1024, 512, 768)}
MASK_RATIO = 0.6


# ---------------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_LIBC = None


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    """glibc only: serve blocks >= nbytes with mmap (freed at once). False if unavailable."""
    global _LIBC
    try:
        import ctypes

        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        return bool(_LIBC.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def _cpu_peak_profiler_mb(step) -> float | None:
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
        _times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(r) for r in sizes]
        return (max(totals) - totals[0]) / 2**20 if totals else 0.0
    except Exception:  # private API: fall back to RSS
        return None


def _cpu_peak_rss_mb(step) -> float | None:
    if not (_cpu_peak_supported() and _mallopt_mmap_threshold(64 * 1024)):
        return None
    try:
        step()  # once more so every block of the step is now mmap-backed and freed
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_kb("VmRSS")
        step()
        return (_proc_status_kb("VmHWM") - base) / 1024
    finally:
        _mallopt_mmap_threshold(128 * 1024)  # glibc's default threshold


def measure_peak_mb(step, device: torch.device) -> tuple[float | None, str]:
    """(peak MiB, method)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda.max_memory_allocated"
    peak = _cpu_peak_profiler_mb(step)
    if peak is not None:
        return peak, "torch.profiler memory timeline"
    peak = _cpu_peak_rss_mb(step)
    return peak, ("RSS high-water (VmHWM)" if peak is not None else "n/a")


def time_ms(step, device: torch.device, iters: int) -> float:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- cases


def unfused_mask_gather(emb, pos, mask_token, ids_keep, ids_mask):
    """The official TimeMAE way: repeat to (B, L, D), add, index."""
    B, L, D = emb.shape
    pos_BLD = pos.unsqueeze(0).repeat(B, 1, 1)
    x = emb + pos_BLD
    rep_mask_token = mask_token.reshape(1, 1, D).repeat(B, L, 1) + pos_BLD

    def take(t, ids):
        return torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, D))

    visible = take(x, ids_keep)
    with torch.no_grad():  # target encoder input: no gradient, as in the fused op
        target_in = take(x, ids_mask)
    queries = take(rep_mask_token, ids_mask)
    return visible, target_in, queries


def mask_gather_case(shape, device, dtype, fused: bool):
    B, L, D = shape
    M = int(MASK_RATIO * L)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, L, D, generator=g, dtype=dtype).to(device).requires_grad_()
    pos = torch.randn(L, D, generator=g, dtype=dtype).to(device).requires_grad_()
    mt = torch.randn(D, generator=g, dtype=dtype).to(device).requires_grad_()
    perm = torch.argsort(torch.rand(B, L, generator=g), dim=1).to(device)
    ids_keep, ids_mask = perm[:, : L - M].contiguous(), perm[:, L - M :].contiguous()
    gv = torch.randn(B, L - M, D, generator=g, dtype=dtype).to(device)
    gq = torch.randn(B, M, D, generator=g, dtype=dtype).to(device)
    fn = fused_mask_gather if fused else unfused_mask_gather

    def step():
        for t in (emb, pos, mt):
            t.grad = None
        visible, _target_in, queries = fn(emb, pos, mt, ids_keep, ids_mask)
        torch.autograd.backward([visible, queries], [gv, gq])
        for t in (emb, pos, mt):
            t.grad = None

    return step


# ---------------------------------------------------------------------------------- main


def kernel_ab_rows(kernel, cases: dict, iters: int, warmup: int, op: str) -> list[dict]:
    """Each case timed with ``kernel`` (a :class:`timemae_dist.kernels.ckernel.CKernel`) off, then on:
    ``warmup`` untimed calls, then the median of ``iters`` timed calls; one row per (case, impl),
    the ``c_kernel`` row with ``speedup`` = eager / c_kernel."""
    from timemae_dist.kernels.ckernel import env_restored

    rows = []
    with env_restored():
        for name, fn in cases.items():
            res = {}
            for impl, mode in (("eager", "off"), ("c_kernel", "on")):
                os.environ[kernel.env] = mode
                if mode == "on":
                    kernel.available("on")  # build/load outside the timing
                for _ in range(warmup):
                    fn()
                ts = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                res[impl] = statistics.median(ts) * 1e6
                rows.append({"op": op, "case": name, "impl": impl, "time_us": round(res[impl], 1), "iters": iters})
            rows[-1]["speedup"] = round(res["eager"] / res["c_kernel"], 2)
    return rows


def dropout_mask_rows(iters: int = 2000) -> list[dict]:
    """Eager vs C-kernel dropout masks (CPU, float32) at the encoder's activation shapes."""
    from timemae_dist.kernels import cpu_dropout
    from timemae_dist.model.layers import keep_mask

    # (B * visible windows, d_model) and the FFN hidden
    cases = {f"{r}x{c}": (lambda x=torch.empty(r, c): keep_mask(x, 0.2)) for r, c in ((1152, 64), (1152, 256))}
    return kernel_ab_rows(cpu_dropout.KERNEL, cases, iters, 50, "dropout_mask")


def fused_rows(iters: int = 300) -> list[dict]:
    """Eager vs fused CPU kernels (float32, training mode, dropout 0.2) at TimeMAE's HAR shapes:
    the attention module (d_model 64, 4 heads) forward + backward (the encoder's self-attention
    over 7 visible windows, the regressor's 9 queries over them) and no-grad forward (the
    momentum target encoder over 9 windows), the post-LN residual forward + backward, GELU and the
    codeword draw."""
    from timemae_dist.kernels import cpu_fused
    from timemae_dist.model import draw_codewords
    from timemae_dist.model.layers import MultiHeadAttention, ResidualNorm

    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4, 0.2).train()
    res_norm = ResidualNorm(64, True, 0.2).train()
    x7, q9 = torch.randn(128, 7, 64, requires_grad=True), torch.randn(128, 9, 64, requires_grad=True)
    y7, g7 = torch.randn(128, 7, 64, requires_grad=True), torch.randn(128, 7, 64)
    x9 = torch.randn(128, 9, 64)
    h, gh = torch.randn(1152, 256), torch.randn(1152, 256)
    tok = torch.randn(1152, 192)  # the masked windows' codeword logits (B 128 x 9 windows, vocab 192)
    hg = h.clone().requires_grad_()

    def ffn_act(t):  # what FeedForward.inner runs between its two Linear layers
        return cpu_fused.gelu(t) if cpu_fused.applies_gelu(t) else torch.nn.functional.gelu(t)

    cases = {
        "attention self 7x7 fwd+bwd": lambda: m(x7, x7).sum().backward(),
        "attention cross 9x7 fwd+bwd": lambda: m(q9, x7).sum().backward(),
        "attention self 9x9 no-grad fwd": lambda: torch.no_grad()(m)(x9, x9),
        "residual LayerNorm 7 fwd+bwd": lambda: res_norm(x7, y7, 0.2).backward(g7),
        "GELU 1152x256 fwd": lambda: torch.no_grad()(ffn_act)(h),
        "GELU 1152x256 fwd+bwd": lambda: ffn_act(hg).backward(gh),
        "codewords 1152x192 (Gumbel argmax)": lambda: draw_codewords(tok),
    }
    return kernel_ab_rows(cpu_fused.KERNEL, cases, iters, 30, "fused")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a last line JSON object of the figures")
    ap.add_argument("--shapes", default="har,large", help="comma list of: har, large")
    ap.add_argument("--iters-har", type=int, default=200, help="timed iterations at the HAR shape")
    ap.add_argument("--iters-large", type=int, default=None, help="timed iterations at the large shape "
                    "(default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--dropout", action="store_true", help="also time CPU dropout masks: eager vs the C kernel")
    ap.add_argument("--fused", action="store_true",
                    help="also time the CPU attention module and the residual LayerNorm: eager vs the fused C kernels")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    if device.type == "cuda":
        path = f"triton kernels on {torch.cuda.get_device_name()}"
    else:
        path = f"CPU: eager torch reference (no GPU; {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    print(f"bench_kernels: {path}; dtype float32; torch {torch.__version__}; {platform.machine()}")

    rows = []
    mem_method = "n/a"
    for shape_name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        shape = SHAPES[shape_name]
        iters = args.iters_har if shape_name == "har" else (
            args.iters_large or (20 if device.type == "cuda" else 3))
        for op in ("mask_gather",):
            res = {}
            for impl in ("unfused", "fused"):
                step = mask_gather_case(shape, device, dtype, fused=(impl == "fused"))
                step()  # warm-up: thread pools, allocator, Triton compile
                ms = time_ms(step, device, iters)
                peak, mem_method = measure_peak_mb(step, device)
                res[impl] = (ms, peak)
                del step
                rows.append({"op": op, "shape": shape_name, "B_L_D": list(shape), "impl": impl,
                             "time_ms": round(ms, 3), "peak_mib": None if peak is None else round(peak, 1),
                             "iters": iters})
            rows[-1]["speedup"] = round(res["unfused"][0] / res["fused"][0], 3)
            if res["fused"][1] and res["unfused"][1] is not None:
                rows[-1]["mem_ratio"] = round(res["unfused"][1] / max(res["fused"][1], 1e-3), 3)

    hdr = f"{'op':<12}{'shape':<7}{'B,L,D':<15}{'impl':<9}{'fwd+bwd ms':>12}{'peak MiB':>10}{'speedup':>9}{'mem x':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        sp = f"{r['speedup']:.2f}" if "speedup" in r else ""
        mx = f"{r['mem_ratio']:.2f}" if "mem_ratio" in r else ""
        print(f"{r['op']:<12}{r['shape']:<7}{','.join(map(str, r['B_L_D'])):<15}{r['impl']:<9}"
              f"{r['time_ms']:>12.3f}{peak:>10}{sp:>9}{mx:>7}")
    print("speedup = unfused time / fused time; mem x = unfused peak / fused peak (higher is better); "
          f"peak memory: {mem_method}")
    drop_rows = dropout_mask_rows() if args.dropout else []
    attn_rows = fused_rows() if args.fused else []
    for title, ab_rows in (("dropout mask (p 0.2, float32, CPU)", drop_rows),
                           ("fused kernels (d 64, 4 heads, B 128, CPU)", attn_rows)):
        if ab_rows:
            print(f"\n{title:<46}{'impl':<10}{'us/call':>9}{'speedup':>9}")
            for r in ab_rows:
                sp = f"{r['speedup']:.2f}" if "speedup" in r else ""
                print(f"{r['case']:<46}{r['impl']:<10}{r['time_us']:>9.1f}{sp:>9}")
    if args.json:
        print(json.dumps({"device": device.type, "path": path, "dtype": "float32",
                          "mask_ratio": MASK_RATIO,
                          "peak_memory_method": mem_method, "results": rows + drop_rows + attn_rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
