"""Fused CPU kernels for TimeMAE's blocks: the attention core, the post-LN residual and GELU, each
one C pass forward and one backward (AVX-512 intrinsics, OpenMP).

TimeMAE's tensors are small (B=128 windows x 7-9 tokens x d_model 64 on HAPT-HAR), so outside the
GEMMs a pretraining step is dozens of element-wise passes, copies and allocations per block.
These kernels fold the two largest groups into one pass each.

**Attention core.** Each (batch, head) pair is a 7x7 or 9x7 problem with 16-wide heads. Eager
PyTorch spends ~1 ms per layer (forward + backward, 2 cores) on it: the head permutes are
copied, the score and weighted-sum ``bmm`` calls run 512 tiny matrices each, and the softmax,
its dropout and their backward are separate passes. The kernel reads q, k and v straight from
the projection's output, ``(B, N, 3, H, Dh)`` for self-attention (one ``q|k|v`` matmul) or
``(B, Q, H, Dh)`` and ``(B, K, 2, H, Dh)`` for the regressor's cross-attention, holds a query
row's scores over the keys in one 16-lane vector (keys padded and masked), and writes the
output in ``(B, Q, H * Dh)`` order, ready for the output projection; the backward writes dq, dk
and dv into one buffer laid out like the projection's output. Equations as
:class:`timemae_dist.model.layers.MultiHeadAttention`'s eager path: ``P = softmax(q k^T /
sqrt(Dh))`` over keys, ``o = (P * mask) v``, ``mask`` the inverted-dropout mask of the
probabilities: the one :func:`timemae_dist.kernels.cpu_dropout.keep_mask_f32` writes for a
``(B, H, Q, K)`` tensor with the same seed. ``exp`` is a Cephes-style polynomial (~1e-7
relative error) scaled with ``vscalefps``. P and the mask are saved for the backward (B*H*Q*K
floats each).

**Residual LayerNorm.** ``LayerNorm(x + a * mask * y)`` (``ResidualNorm``: the learnable scalar
``a``, the merged feed-forward + residual dropout mask) per row, and its backward (dx, dy, da,
dweight, dbias; the mask regenerated from its seed instead of stored). The mask is the one
``keep_mask(y, p)`` draws through the C dropout kernel (same seed draw, same stream), so a run
with the fused residual draws the same masks as one without.

For :mod:`timemae_dist.kernels.cpu_block` (a whole block as one autograd node) the residual
kernel also takes a bias of ``y`` (the GEMM before it then runs without one) and sums its
gradient, and a GELU variant runs on ``h + b`` and sums ``b``'s gradient; the functional
forms (``attn_forward``/``attn_backward``, ``resnorm_forward``/``resnorm_backward``,
``gelu_bias_forward``/``gelu_bias_backward``) run the kernels without autograd.

**Codewords.** The forward's codeword draw, ``argmax(logits + G)`` with G standard Gumbel noise
(:func:`gumbel_argmax`, through :func:`timemae_dist.model.draw_codewords`), in one pass per row:
the noise from a SplitMix64 counter stream and a vectorised log, never stored; eagerly it is
``rand``, two ``log``, ``add`` and ``argmax`` over a (B * masked windows, vocab) tensor.

**GELU.** The exact form ``x * Phi(x)`` (as ``F.gelu``) with Phi from Abramowitz & Stegun 7.1.26
(absolute error <= 1.5e-7, one ``exp`` shared with the pdf the backward needs). About as fast as
torch's forward, 2x faster than its backward (which evaluates erf and exp separately).

Both: one seed per call from one ``random_()`` draw of torch's default generator (so
``torch.manual_seed`` and checkpointed RNG states determine the masks); OpenMP loops on torch's
own OpenMP runtime (the library links ``libgomp.so.1`` by soname, which resolves to the copy
torch has already loaded: one thread pool, no second set of spinning threads); each task's
arithmetic in a fixed order and the parameter-gradient sums over fixed row chunks, so results
do not depend on the thread count.

Where they apply: float32 CPU tensors, no autocast, a CPU with AVX-512 (F, DQ, BW, VL);
attention with at most :data:`MAX_KEYS` keys, :data:`MAX_QUERIES` queries and heads
:data:`HEAD_DIMS` wide; residuals of width a multiple of 16 up to :data:`MAX_WIDTH`. Elsewhere
(GPU, bf16/fp16, long sequences, narrow heads, CPUs without AVX-512) the model runs the eager
ops; GELU applies to any float32 CPU tensor. ``TIMEMAE_CPU_FUSED`` / ``trainer.cpu_fused``: ``auto`` (default) uses the kernels where they
build and apply, ``on`` raises where they cannot build, ``off`` always runs the eager ops.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from timemae_dist.kernels.ckernel import CKernel, CKernelError

__all__ = ["CpuFusedError", "KERNEL", "MAX_KEYS", "MAX_QUERIES", "HEAD_DIMS", "MAX_WIDTH", "mode", "effective_mode",
           "available", "describe", "applies", "attention_core", "applies_residual", "residual_norm",
           "applies_gelu", "gelu", "applies_gumbel", "gumbel_argmax", "is_zero3_partition",
           "library_path", "build"]

_ENV = "TIMEMAE_CPU_FUSED"
MAX_KEYS = 16  # the keys are the lanes of one AVX-512 vector
MAX_QUERIES = 64
HEAD_DIMS = (16, 32, 48, 64)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#define GOLDEN 0x9E3779B97F4A7C15ull
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 1 where this CPU runs the kernels (AVX-512 F/DQ/BW/VL), else 0 */
int timemae_attn_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

/* exp(x) lane-wise (Cephes expf polynomial on |r| <= ln2/2, 2^n by scalef); x >= -87.3 expected */
AVX512 static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Dropout mask values of flat elements start .. start + n - 1, as timemae_keep_mask_f32 writes
   them: element i takes 15 bits of SplitMix64 output (i >> 2) + 1, so one hash serves 4 elements
   (the aligned groups hash once; a group cut by start or the end, once per element). */
static inline float keep_one(uint64_t seed, uint64_t i, int32_t thr, float scale) {
    const uint64_t z = splitmix64(seed + ((i >> 2) + 1) * GOLDEN);
    return (int32_t)((z >> ((i & 3) * 16)) & 0x7fff) < thr ? scale : 0.0f;
}

AVX512 static inline void keep_block(float *m, uint64_t seed, uint64_t start, int64_t n, int32_t thr, float scale) {
    int64_t t = 0;
    for (; t < n && ((start + (uint64_t)t) & 3); ++t) m[t] = keep_one(seed, start + (uint64_t)t, thr, scale);
    const int64_t groups = (n - t) >> 2;
    const uint64_t g0 = (start + (uint64_t)t) >> 2;
    float *mg = m + t;
    for (int64_t g = 0; g < groups; ++g) {
        const uint64_t z = splitmix64(seed + (g0 + (uint64_t)g + 1) * GOLDEN);
        for (int j = 0; j < 4; ++j) mg[4 * g + j] = (int32_t)((z >> (16 * j)) & 0x7fff) < thr ? scale : 0.0f;
    }
    for (t += 4 * groups; t < n; ++t) m[t] = keep_one(seed, start + (uint64_t)t, thr, scale);
}

/* One (batch, head) pair: keys are the 16 lanes of a vector (K <= 16, lanes >= K masked), the
   head dimension Dh = 16 * C runs in C vectors. q/k/v rows: qh + i * qrs etc.; out rows: ob + i * D. */
AVX512 static void fwd_task(const float *qh, int64_t qrs, const float *kh, int64_t krs, const float *vh,
                            int64_t vrs, int64_t bh, int64_t Q, int64_t K, int64_t C, float scale, int32_t thr,
                            float dscale, uint64_t seed, float *ob, int64_t D, float *P, float *M) {
    const __mmask16 km = (__mmask16)((1u << K) - 1u);
    const int64_t Dh = 16 * C;
    float kT[64 * 16] __attribute__((aligned(64)));
    for (int64_t j = 0; j < 16; ++j)
        for (int64_t d = 0; d < Dh; ++d) kT[d * 16 + j] = j < K ? kh[j * krs + d] : 0.0f;
    float pd[16] __attribute__((aligned(64))), mt[64 * 16];  /* Q <= 64 */
    if (thr > 0) keep_block(mt, seed, (uint64_t)(bh * Q * K), Q * K, thr, dscale);
    for (int64_t i = 0; i < Q; ++i) {
        const float *qrow = qh + i * qrs;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dh; d += 2) {
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(qrow[d]), _mm512_load_ps(kT + d * 16), s0);
            s1 = _mm512_fmadd_ps(_mm512_set1_ps(qrow[d + 1]), _mm512_load_ps(kT + (d + 1) * 16), s1);
        }
        __m512 s = _mm512_mul_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(scale));
        const float mx = _mm512_mask_reduce_max_ps(km, s);
        __m512 e = _mm512_maskz_mov_ps(km, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
        const __m512 p = _mm512_mul_ps(e, _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(e)));
        const int64_t base = (bh * Q + i) * K;
        const __m512 mv = thr > 0 ? _mm512_maskz_loadu_ps(km, mt + i * K) : _mm512_set1_ps(1.0f);
        if (P) {
            _mm512_mask_storeu_ps(P + base, km, p);
            _mm512_mask_storeu_ps(M + base, km, mv);
        }
        _mm512_store_ps(pd, _mm512_mul_ps(p, mv));
        float *orow = ob + i * D;
        for (int64_t c = 0; c < C; ++c) {
            __m512 o = _mm512_setzero_ps();
            for (int64_t j = 0; j < K; ++j)
                o = _mm512_fmadd_ps(_mm512_set1_ps(pd[j]), _mm512_loadu_ps(vh + j * vrs + 16 * c), o);
            _mm512_storeu_ps(orow + 16 * c, o);
        }
    }
}

/* The attention core over all (batch, head) pairs. q/k/v: element (b, n, h, d) at
   base + b*bs + n*rs + h*Dh + d; out (B, Q, H*Dh) contiguous; P, M (B, H, Q, K) saved when
   not NULL. thr <= 0: no dropout. Requires K <= 16, Q <= 64, Dh in {16, 32, 48, 64}, AVX-512. */
AVX512 void timemae_attn_fwd(const float *q, int64_t qbs, int64_t qrs, const float *k, int64_t kbs, int64_t krs,
                             const float *v, int64_t vbs, int64_t vrs, int64_t B, int64_t H, int64_t Q, int64_t K,
                             int64_t Dh, float scale, int32_t thr, float dscale, const int64_t *seed_ptr,
                             float *out, float *P, float *M, int32_t nthreads) {
    const uint64_t seed = thr > 0 ? (uint64_t)seed_ptr[0] : 0;
    const int64_t D = H * Dh;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        fwd_task(q + b * qbs + h * Dh, qrs, k + b * kbs + h * Dh, krs, v + b * vbs + h * Dh, vrs, bh, Q, K,
                 Dh / 16, scale, thr, dscale, seed, out + b * Q * D + h * Dh, D, P, M);
    }
}

/* Backward of one (batch, head) pair; every element of its dq/dk/dv slices is written. */
AVX512 static void bwd_task(const float *gb, int64_t D, const float *qh, int64_t qrs, const float *kh,
                            int64_t krs, const float *vh, int64_t vrs, const float *P, const float *M, int64_t bh,
                            int64_t Q, int64_t K, int64_t C, float scale, float *dqh, int64_t dqrs, float *dkh,
                            int64_t dkrs, float *dvh, int64_t dvrs) {
    const __mmask16 km = (__mmask16)((1u << K) - 1u);
    const int64_t Dh = 16 * C;
    float vT[64 * 16] __attribute__((aligned(64)));
    float dk[16 * 64] __attribute__((aligned(64))), dv[16 * 64] __attribute__((aligned(64)));
    for (int64_t j = 0; j < 16; ++j)
        for (int64_t d = 0; d < Dh; ++d) vT[d * 16 + j] = j < K ? vh[j * vrs + d] : 0.0f;
    memset(dk, 0, sizeof(float) * K * Dh);
    memset(dv, 0, sizeof(float) * K * Dh);
    float pd[16] __attribute__((aligned(64))), g[16] __attribute__((aligned(64)));
    for (int64_t i = 0; i < Q; ++i) {
        const float *grow = gb + i * D, *qrow = qh + i * qrs;
        const int64_t base = (bh * Q + i) * K;
        const __m512 p = _mm512_maskz_loadu_ps(km, P + base), m = _mm512_maskz_loadu_ps(km, M + base);
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dh; d += 2) {
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(grow[d]), _mm512_load_ps(vT + d * 16), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(grow[d + 1]), _mm512_load_ps(vT + (d + 1) * 16), a1);
        }
        const __m512 dp = _mm512_mul_ps(_mm512_add_ps(a0, a1), m);                 /* dL/dP */
        const float dot = _mm512_reduce_add_ps(_mm512_mul_ps(dp, p));              /* sum_k P dL/dP */
        _mm512_store_ps(g, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, _mm512_set1_ps(dot))),
                                         _mm512_set1_ps(scale)));                  /* dL/d(q.k) */
        _mm512_store_ps(pd, _mm512_mul_ps(p, m));
        for (int64_t c = 0; c < C; ++c) {
            const __m512 gc = _mm512_loadu_ps(grow + 16 * c), qc = _mm512_loadu_ps(qrow + 16 * c);
            __m512 dq = _mm512_setzero_ps();
            for (int64_t j = 0; j < K; ++j) {
                const __m512 gj = _mm512_set1_ps(g[j]);
                float *dvj = dv + j * Dh + 16 * c, *dkj = dk + j * Dh + 16 * c;
                _mm512_store_ps(dvj, _mm512_fmadd_ps(_mm512_set1_ps(pd[j]), gc, _mm512_load_ps(dvj)));
                _mm512_store_ps(dkj, _mm512_fmadd_ps(gj, qc, _mm512_load_ps(dkj)));
                dq = _mm512_fmadd_ps(gj, _mm512_loadu_ps(kh + j * krs + 16 * c), dq);
            }
            _mm512_storeu_ps(dqh + i * dqrs + 16 * c, dq);
        }
    }
    for (int64_t j = 0; j < K; ++j)
        for (int64_t c = 0; c < C; ++c) {
            _mm512_storeu_ps(dkh + j * dkrs + 16 * c, _mm512_load_ps(dk + j * Dh + 16 * c));
            _mm512_storeu_ps(dvh + j * dvrs + 16 * c, _mm512_load_ps(dv + j * Dh + 16 * c));
        }
}

/* Gradients of timemae_attn_fwd. go: (B, Q, H*Dh) contiguous. dq/dk/dv laid out as q/k/v
   (their own base, batch and row strides). */
AVX512 void timemae_attn_bwd(const float *go, const float *q, int64_t qbs, int64_t qrs, const float *k,
                             int64_t kbs, int64_t krs, const float *v, int64_t vbs, int64_t vrs, const float *P,
                             const float *M, int64_t B, int64_t H, int64_t Q, int64_t K, int64_t Dh, float scale,
                             float *dq, int64_t dqbs, int64_t dqrs, float *dk, int64_t dkbs, int64_t dkrs,
                             float *dv, int64_t dvbs, int64_t dvrs, int32_t nthreads) {
    const int64_t D = H * Dh;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        bwd_task(go + b * Q * D + h * Dh, D, q + b * qbs + h * Dh, qrs, k + b * kbs + h * Dh, krs,
                 v + b * vbs + h * Dh, vrs, P, M, bh, Q, K, Dh / 16, scale, dq + b * dqbs + h * Dh, dqrs,
                 dk + b * dkbs + h * Dh, dkrs, dv + b * dvbs + h * Dh, dvrs);
    }
}

/* Post-LN residual: out = LayerNorm(x + a * m * (y + yb)) over rows of D (yb a (D,) bias of y, or
   NULL for none), m the inverted-dropout mask
   of flat element n * D + d (as timemae_keep_mask_f32 writes it for a (N, D) tensor), and its
   backward. D a multiple of 16, <= 1024. */
#define MAX_D 1024

AVX512 static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* z (N, D) saved for the backward when not NULL (else out holds it in between). */
AVX512 void timemae_resnorm_fwd(const float *x, const float *y, const float *yb, int64_t N, int64_t D, float a,
                                int32_t thr, float dscale, const int64_t *seed_ptr, const float *gamma,
                                const float *beta, float eps, float *out, float *z, float *mean, float *rstd,
                                int32_t nthreads) {
    const uint64_t seed = thr > 0 ? (uint64_t)seed_ptr[0] : 0;
    const float invD = 1.0f / (float)D;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        float m[MAX_D] __attribute__((aligned(64)));
        if (thr > 0) keep_block(m, seed, (uint64_t)(n * D), D, thr, dscale);
        const float *xr = x + n * D, *yr = y + n * D;
        float *zr = (z ? z : out) + n * D, *orow = out + n * D;
        const __m512 av = _mm512_set1_ps(a);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 s = av;
            if (thr > 0) s = _mm512_mul_ps(s, _mm512_load_ps(m + d));
            __m512 yv = _mm512_loadu_ps(yr + d);
            if (yb) yv = _mm512_add_ps(yv, _mm512_loadu_ps(yb + d));
            const __m512 zv = _mm512_fmadd_ps(s, yv, _mm512_loadu_ps(xr + d));
            _mm512_storeu_ps(zr + d, zv);
            acc = _mm512_add_ps(acc, zv);
        }
        const float mu = hsum(acc) * invD;
        const __m512 muv = _mm512_set1_ps(mu);
        __m512 vacc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(zr + d), muv);
            vacc = _mm512_fmadd_ps(c, c, vacc);
        }
        const float r = 1.0f / sqrtf(hsum(vacc) * invD + eps);
        const __m512 rv = _mm512_set1_ps(r);
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(zr + d), muv), rv);
            _mm512_storeu_ps(orow + d, _mm512_fmadd_ps(xh, _mm512_loadu_ps(gamma + d), _mm512_loadu_ps(beta + d)));
        }
        if (mean) { mean[n] = mu; rstd[n] = r; }
    }
}

/* Gradients: dx (= dz), dy = dz * a * m (NULL: not needed), and per chunk of `chunk` rows the
   partial sums partial[c] = [dgamma (D), dbeta (D), dyb (D, = the rows' sum of dy), da (1)], summed over chunks by the caller
   (fixed chunks: the result does not depend on the thread count). */
AVX512 void timemae_resnorm_bwd(const float *go, const float *z, const float *y, const float *yb,
                                const float *mean, const float *rstd, const float *gamma, int64_t N, int64_t D,
                                float a, int32_t thr, float dscale, const int64_t *seed_ptr, float *dx, float *dy,
                                float *partial, int64_t chunk, int32_t nthreads) {
    const uint64_t seed = thr > 0 ? (uint64_t)seed_ptr[0] : 0;
    const float invD = 1.0f / (float)D;
    const int64_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {
        float m[MAX_D] __attribute__((aligned(64)));
        float *pg = partial + c * (3 * D + 1), *pb = pg + D, *py = pg + 2 * D;
        for (int64_t d = 0; d < 3 * D + 1; ++d) pg[d] = 0.0f;
        __m512 da = _mm512_setzero_ps();
        const __m512 av = _mm512_set1_ps(a);
        const int64_t end = (c + 1) * chunk < N ? (c + 1) * chunk : N;
        for (int64_t n = c * chunk; n < end; ++n) {
            if (thr > 0) keep_block(m, seed, (uint64_t)(n * D), D, thr, dscale);
            const float *gr = go + n * D, *zr = z + n * D, *yr = y + n * D;
            const __m512 muv = _mm512_set1_ps(mean[n]), rv = _mm512_set1_ps(rstd[n]);
            __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 g = _mm512_loadu_ps(gr + d);
                const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(zr + d), muv), rv);
                const __m512 dxh = _mm512_mul_ps(g, _mm512_loadu_ps(gamma + d));
                s1 = _mm512_add_ps(s1, dxh);
                s2 = _mm512_fmadd_ps(dxh, xh, s2);
                _mm512_storeu_ps(pg + d, _mm512_fmadd_ps(g, xh, _mm512_loadu_ps(pg + d)));
                _mm512_storeu_ps(pb + d, _mm512_add_ps(g, _mm512_loadu_ps(pb + d)));
            }
            const __m512 m1 = _mm512_set1_ps(hsum(s1) * invD), m2 = _mm512_set1_ps(hsum(s2) * invD);
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 g = _mm512_loadu_ps(gr + d);
                const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(zr + d), muv), rv);
                const __m512 dxh = _mm512_mul_ps(g, _mm512_loadu_ps(gamma + d));
                const __m512 dz = _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(dxh, m1), _mm512_mul_ps(xh, m2)));
                _mm512_storeu_ps(dx + n * D + d, dz);
                const __m512 mv = thr > 0 ? _mm512_load_ps(m + d) : _mm512_set1_ps(1.0f);
                const __m512 dzm = _mm512_mul_ps(dz, mv), dyv = _mm512_mul_ps(dzm, av);
                if (dy) _mm512_storeu_ps(dy + n * D + d, dyv);
                _mm512_storeu_ps(py + d, _mm512_add_ps(dyv, _mm512_loadu_ps(py + d)));
                __m512 yv = _mm512_loadu_ps(yr + d);
                if (yb) yv = _mm512_add_ps(yv, _mm512_loadu_ps(yb + d));
                da = _mm512_fmadd_ps(dzm, yv, da);
            }
        }
        pg[3 * D] = hsum(da);
    }
}

/* GELU (exact form, x * Phi(x)) and its backward, lane-wise. Phi from Abramowitz & Stegun 7.1.26
   (erfc(z) = t * P(t) * exp(-z^2), t = 1 / (1 + 0.3275911 z), |error| <= 1.5e-7) applied to
   z = |x| / sqrt(2), so Phi(-|x|) = erfc(z) / 2 and the pdf share one exp. */
AVX512 static inline void normal_cdf_pdf(__m512 x, __m512 *cdf, __m512 *pdf) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
    const __m512 den = _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(den);  /* 1 / den: 14-bit estimate + one Newton step (~23 bits) */
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = exp16(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.0f)));  /* exp(-x^2 / 2) */
    const __m512 q = _mm512_mul_ps(_mm512_mul_ps(p, e), _mm512_set1_ps(0.5f));            /* Phi(-|x|) */
    const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    *cdf = _mm512_mask_sub_ps(q, pos, _mm512_set1_ps(1.0f), q);
    *pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.39894228040143268f));
}

/* GELU of h + b (h (rows, cols) row-major, b (cols,), cols a multiple of 16): g == NULL: out =
   gelu(h + b); else out = g * gelu'(h + b) and, per chunk of `chunk` rows, partial[c] (cols) =
   the chunk's column sums of out (the bias gradient, summed over chunks by the caller). */
AVX512 void timemae_gelu_bias(const float *h, const float *b, const float *g, float *out, float *partial,
                              int64_t rows, int64_t cols, int64_t chunk, int32_t nthreads) {
    const int64_t nchunks = (rows + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t end = (c + 1) * chunk < rows ? (c + 1) * chunk : rows;
        float *pc = g ? partial + c * cols : NULL;
        if (pc) for (int64_t j = 0; j < cols; ++j) pc[j] = 0.0f;
        for (int64_t r = c * chunk; r < end; ++r) {
            const float *hr = h + r * cols;
            float *orow = out + r * cols;
            for (int64_t j = 0; j < cols; j += 16) {
                const __m512 v = _mm512_add_ps(_mm512_loadu_ps(hr + j), _mm512_loadu_ps(b + j));
                __m512 cdf, pdf;
                normal_cdf_pdf(v, &cdf, &pdf);
                if (g) {
                    const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(g + r * cols + j), _mm512_fmadd_ps(v, pdf, cdf));
                    _mm512_storeu_ps(orow + j, d);
                    _mm512_storeu_ps(pc + j, _mm512_add_ps(d, _mm512_loadu_ps(pc + j)));
                } else {
                    _mm512_storeu_ps(orow + j, _mm512_mul_ps(v, cdf));
                }
            }
        }
    }
}

#define GELU_CHUNK 4096

/* g == NULL: out = x * Phi(x) (forward); else out = g * (Phi(x) + x * phi(x)) (backward); n elements */
AVX512 void timemae_gelu(const float *x, const float *g, float *out, int64_t n, int32_t nthreads) {
    const int64_t chunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t end = (c + 1) * GELU_CHUNK < n ? (c + 1) * GELU_CHUNK : n;
        for (int64_t i = c * GELU_CHUNK; i < end; i += 16) {
            const __mmask16 m = end - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - i)) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
            __m512 cdf, pdf;
            normal_cdf_pdf(v, &cdf, &pdf);
            const __m512 r = g ? _mm512_mul_ps(_mm512_maskz_loadu_ps(m, g + i), _mm512_fmadd_ps(v, pdf, cdf))
                               : _mm512_mul_ps(v, cdf);
            _mm512_mask_storeu_ps(out + i, m, r);
        }
    }
}

/* ln(x) lane-wise for x > 0 (Cephes logf: x = m * 2^e, m in [sqrt(1/2), sqrt(2)), a degree-9
   polynomial in m - 1; ~1e-7 relative error) */
AVX512 static inline __m512 log16(__m512 x) {
    const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.41421356f)));
    const __m512 f = _mm512_sub_ps(_mm512_scalef_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), e)), _mm512_set1_ps(1.0f));
    const __m512 z = _mm512_mul_ps(f, f);
    __m512 y = _mm512_set1_ps(7.0376836292E-2f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
    return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

/* Codewords: out[r] = argmax_k (logits[r, k] + G[r, k]) over rows of K, G = -log(-log(U)) standard
   Gumbel noise, U = (u23 + 0.5) / 2^23 in [2^-24, 1 - 2^-24] (exact in float32: never 0 or 1, so G
   is finite) with u23 the top 23 bits of one 32-bit half of SplitMix64 output
   (seed + (r * ceil(K / 2) + k / 2 + 1) * GOLDEN) (low half for even k). The first
   largest k wins (as torch.argmax). noise != NULL: G is also written there (rows x K, for tests). */
AVX512 void timemae_gumbel_argmax(const float *logits, int64_t rows, int64_t K, const int64_t *seed_ptr,
                                  int64_t *out, float *noise, int32_t nthreads) {
    const uint64_t seed = (uint64_t)seed_ptr[0];
    const int64_t pairs = (K + 1) / 2;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i g8 = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_k = _mm512_setzero_si512();
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const __mmask16 m = K - k0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k0)) - 1u);
            const uint64_t c0 = (uint64_t)(r * pairs + k0 / 2 + 1);
            __m512i z = _mm512_add_epi64(_mm512_set1_epi64((long long)seed),
                                         _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64((long long)c0), g8),
                                                            _mm512_set1_epi64((long long)GOLDEN)));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                                   _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull));
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                                   _mm512_set1_epi64((long long)0x94D049BB133111EBull));
            z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
            const __m512 u = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(z, 9)),
                                                         _mm512_set1_ps(0.5f)), _mm512_set1_ps(0x1p-23f));
            const __m512 g = _mm512_sub_ps(_mm512_setzero_ps(),
                                           log16(_mm512_sub_ps(_mm512_setzero_ps(), log16(u))));
            if (noise) _mm512_mask_storeu_ps(noise + r * K + k0, m, g);
            const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, logits + r * K + k0), g);
            const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, gt, v);
            best_k = _mm512_mask_mov_epi32(best_k, gt, _mm512_add_epi32(lane, _mm512_set1_epi32((int)k0)));
        }
        const float mx = _mm512_reduce_max_ps(best);
        const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(mx), _CMP_EQ_OQ);
        out[r] = at ? (int64_t)_mm512_mask_reduce_min_epi32(at, best_k) : 0;
    }
}

/* ------------------------------------------------------------------------------------------
   A whole block (cpu_block) as one call each way: the GEMMs through the BLAS sgemm that PyTorch
   itself calls (oneMKL in x86 wheels; its address handed over by timemae_block_set_sgemm), the
   kernels above in between; no Python, dispatch or allocator work per op. */

typedef void (*sgemm_fn)(const char *, const char *, const void *, const void *, const void *, const float *,
                         const float *, const void *, const float *, const void *, const float *, float *,
                         const void *);
static sgemm_fn blas_sgemm = NULL;

/* Fortran sgemm_; its integers are passed as 64-bit values below 2^31, which an LP64 BLAS (32-bit
   integers) reads the same on a little-endian CPU as an ILP64 one does. */
void timemae_block_set_sgemm(void *f) { blas_sgemm = (sgemm_fn)f; }

/* Row-major C (M x N) = op(A) op(B) + beta C; op(A) M x K (ta: A stored K x M), op(B) K x N (tb: B
   stored N x K); as the column-major C^T = op(B)^T op(A)^T. */
void timemae_block_mm(int32_t ta, int32_t tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    const int64_t m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    const float one = 1.0f;
    blas_sgemm(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}
#define MM timemae_block_mm

#define BLOCK_CHUNK 64  /* rows per partial sum (as cpu_fused._CHUNK): thread-count independent */

static int64_t up16(int64_t n) { return (n + 15) & ~(int64_t)15; }
static float *falloc(int64_t n) { return (float *)aligned_alloc(64, (size_t)up16(n > 0 ? n : 1) * sizeof(float)); }

/* rows of C (ldc) = b (cols), ahead of a GEMM with beta 1 (as addmm) */
AVX512 static void fill_rows(float *C, int64_t rows, int64_t cols, int64_t ldc, const float *b, int32_t nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) memcpy(C + r * ldc, b, sizeof(float) * (size_t)cols);
}

/* sum over chunks of partial rows (width w) into out (w), in chunk order */
static void chunk_sum(const float *part, int64_t nch, int64_t w, float *out) {
    for (int64_t j = 0; j < w; ++j) out[j] = 0.0f;
    for (int64_t c = 0; c < nch; ++c)
        for (int64_t j = 0; j < w; ++j) out[j] += part[c * w + j];
}

/* out (cols) = the column sums of a (rows x cols, lda), cols a multiple of 16: partial sums over
   fixed chunks of rows (into part, ceil(rows / BLOCK_CHUNK) x cols), then added in chunk order */
AVX512 static void colsum(const float *a, int64_t rows, int64_t cols, int64_t lda, float *out, float *part,
                          int32_t nthreads) {
    const int64_t nch = (rows + BLOCK_CHUNK - 1) / BLOCK_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nch; ++c) {
        float *p = part + c * cols;
        const int64_t end = (c + 1) * BLOCK_CHUNK < rows ? (c + 1) * BLOCK_CHUNK : rows;
        for (int64_t j = 0; j < cols; j += 16) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t r = c * BLOCK_CHUNK; r < end; ++r) s = _mm512_add_ps(s, _mm512_loadu_ps(a + r * lda + j));
            _mm512_storeu_ps(p + j, s);
        }
    }
    chunk_sum(part, nch, cols, out);
}

/* timemae_resnorm_bwd over R rows, its partial sums (part) then reduced into dg, dbe, dyb (D each), da (1) */
AVX512 static void resnorm_bwd_sums(const float *go, const float *z, const float *y, const float *yb,
                                    const float *mean, const float *rstd, const float *gamma, int64_t R, int64_t D,
                                    float a, int32_t thr, float dscale, const int64_t *seed, float *dx, float *dy,
                                    float *part, float *dg, float *dbe, float *dyb, float *da, int32_t nthreads) {
    float sums[3 * MAX_D + 1];
    timemae_resnorm_bwd(go, z, y, yb, mean, rstd, gamma, R, D, a, thr, dscale, seed, dx, dy, part, BLOCK_CHUNK,
                        nthreads);
    chunk_sum(part, (R + BLOCK_CHUNK - 1) / BLOCK_CHUNK, 3 * D + 1, sums);
    memcpy(dg, sums, sizeof(float) * (size_t)D);
    memcpy(dbe, sums + D, sizeof(float) * (size_t)D);
    memcpy(dyb, sums + 2 * D, sizeof(float) * (size_t)D);
    *da = sums[3 * D];
}

/* dims: B, N (queries), Nk (keys), D, F (feed-forward width), H, grad, self (1: kv is x) */
typedef struct { int64_t qs, kvs, P, M, o, y1, x1, h, u, y2, z1, z2, mean1, rstd1, mean2, rstd2, total; } block_ws;

static block_ws ws_layout(const int64_t *d) {
    const int64_t B = d[0], N = d[1], Nk = d[2], D = d[3], F = d[4], H = d[5], grad = d[6], self = d[7];
    const int64_t R = B * N, Rk = B * Nk, att = grad ? up16(B * H * N * Nk) : 0;
    block_ws L;
    int64_t off = 0;
#define PUT(field, n) (L.field = off, off += up16(n))
    PUT(qs, R * (self ? 3 * D : D)); PUT(kvs, self ? 0 : Rk * 2 * D);
    PUT(P, att); PUT(M, att);
    PUT(o, R * D); PUT(y1, R * D); PUT(x1, R * D); PUT(h, R * F); PUT(u, R * F); PUT(y2, R * D);
    PUT(z1, grad ? R * D : 0); PUT(z2, grad ? R * D : 0);
    PUT(mean1, grad ? R : 0); PUT(rstd1, grad ? R : 0); PUT(mean2, grad ? R : 0); PUT(rstd2, grad ? R : 0);
#undef PUT
    L.total = off;
    return L;
}

/* floats of the forward's workspace (what the backward reads back) */
int64_t timemae_block_ws_size(const int64_t *dims) { return ws_layout(dims).total; }

/* s[i] = the seed of dropout site i (attention, residual 1, residual 2): the next of seeds for each
   site with thr > 0, in that order; NULL for a site without dropout */
static void site_seeds(const int32_t *thr, const int64_t *seeds, const int64_t *s[3]) {
    for (int i = 0; i < 3; ++i) s[i] = thr[i] > 0 ? seeds++ : NULL;
}

/* s = a | b (| c): the q|k|v (self) or k|v (cross) weights, or biases, back to back (n floats each) */
static void stack(float *s, const float *a, const float *b, const float *c, int64_t n) {
    memcpy(s, a, sizeof(float) * (size_t)n);
    memcpy(s + n, b, sizeof(float) * (size_t)n);
    if (c) memcpy(s + 2 * n, c, sizeof(float) * (size_t)n);
}

/* w (18): wq bq wk bk wv bv wo bo g1 be1 a1 w1 b1 w2 b2 g2 be2 a2 (a1/a2 NULL: the constant 1)
   fl: eps1, eps2, dropout scales (attention, residual 1, residual 2); thr: their keep thresholds
   (0: no dropout); seeds: one per site with thr > 0, in that order. Returns 0, or 1 when out of
   memory for its scratch (nothing written then). */
AVX512 int32_t timemae_block_fwd(const float *x, const float *kv, const float *const *w, const int64_t *dims,
                              const float *fl, const int32_t *thr, const int64_t *seeds, float *ws, float *out,
                              int32_t nthreads) {
    const int64_t B = dims[0], N = dims[1], Nk = dims[2], D = dims[3], F = dims[4], H = dims[5];
    const int grad = dims[6] != 0, self = dims[7] != 0;
    const int64_t R = B * N, Rk = B * Nk, Dh = D / H;
    const block_ws L = ws_layout(dims);
    const int64_t *sd[3];
    site_seeds(thr, seeds, sd);
    const float a1 = w[10] ? w[10][0] : 1.0f, a2 = w[17] ? w[17][0] : 1.0f;
    float *qs = ws + L.qs, *kvs = ws + L.kvs, *o = ws + L.o, *y1 = ws + L.y1, *x1 = ws + L.x1;
    float *h = ws + L.h, *u = ws + L.u, *y2 = ws + L.y2;
    const float *q, *k, *v;
    int64_t qbs, qrs, kbs, krs;
    float *W = falloc(3 * D * D), *b = falloc(3 * D);
    if (!W || !b) { free(W); free(b); return 1; }
    if (self) {
        stack(W, w[0], w[2], w[4], D * D);
        stack(b, w[1], w[3], w[5], D);
        fill_rows(qs, R, 3 * D, 3 * D, b, nthreads);
        MM(0, 1, R, 3 * D, D, x, D, W, D, 1.0f, qs, 3 * D);
        q = qs; k = qs + D; v = qs + 2 * D; qbs = kbs = N * 3 * D; qrs = krs = 3 * D;
    } else {
        stack(W, w[2], w[4], NULL, D * D);
        stack(b, w[3], w[5], NULL, D);
        fill_rows(qs, R, D, D, w[1], nthreads);
        MM(0, 1, R, D, D, x, D, w[0], D, 1.0f, qs, D);
        fill_rows(kvs, Rk, 2 * D, 2 * D, b, nthreads);
        MM(0, 1, Rk, 2 * D, D, kv, D, W, D, 1.0f, kvs, 2 * D);
        q = qs; k = kvs; v = kvs + D; qbs = N * D; qrs = D; kbs = Nk * 2 * D; krs = 2 * D;
    }
    free(W); free(b);
    timemae_attn_fwd(q, qbs, qrs, k, kbs, krs, v, kbs, krs, B, H, N, Nk, Dh, (float)(1.0 / sqrt((double)Dh)),
                     thr[0], fl[2], sd[0], o, grad ? ws + L.P : NULL, grad ? ws + L.M : NULL, nthreads);
    MM(0, 1, R, D, D, o, D, w[6], D, 0.0f, y1, D);
    timemae_resnorm_fwd(x, y1, w[7], R, D, a1, thr[1], fl[3], sd[1], w[8], w[9], fl[0], x1, grad ? ws + L.z1 : NULL,
                        grad ? ws + L.mean1 : NULL, grad ? ws + L.rstd1 : NULL, nthreads);
    MM(0, 1, R, F, D, x1, D, w[11], D, 0.0f, h, F);
    timemae_gelu_bias(h, w[12], NULL, u, NULL, R, F, BLOCK_CHUNK, nthreads);
    MM(0, 1, R, D, F, u, F, w[13], F, 0.0f, y2, D);
    timemae_resnorm_fwd(x1, y2, w[14], R, D, a2, thr[2], fl[4], sd[2], w[15], w[16], fl[1], out,
                        grad ? ws + L.z2 : NULL, grad ? ws + L.mean2 : NULL, grad ? ws + L.rstd2 : NULL, nthreads);
    return 0;
}

/* Gradients of timemae_block_fwd (same x, kv, w, dims, fl, thr, seeds; ws as it left it) for the
   upstream gradient go (R x D): dx (R x D), dkv (Rk x D, cross only), gw_in (3D x D: dwq, dwk,
   dwv), gwo (D x D), gw1 (F x D), gw2 (D x F), gsmall: dbq dbk dbv (3D), dbo, dg1, dbe1 (D each),
   da1 (1), db1 (F), db2, dg2, dbe2 (D each), da2 (1). Returns 0, or 1 when out of memory for its
   scratch (nothing written then). */
AVX512 int32_t timemae_block_bwd(const float *go, const float *x, const float *kv, const float *const *w,
                              const int64_t *dims, const float *fl, const int32_t *thr, const int64_t *seeds,
                              const float *ws, float *dx, float *dkv, float *gw_in, float *gwo, float *gw1,
                              float *gw2, float *gsmall, int32_t nthreads) {
    const int64_t B = dims[0], N = dims[1], Nk = dims[2], D = dims[3], F = dims[4], H = dims[5];
    const int self = dims[7] != 0;
    const int64_t R = B * N, Rk = B * Nk, Dh = D / H;
    const block_ws L = ws_layout(dims);
    const int64_t *sd[3];
    site_seeds(thr, seeds, sd);
    const float a1 = w[10] ? w[10][0] : 1.0f, a2 = w[17] ? w[17][0] : 1.0f;
    const float *qs = ws + L.qs, *kvs = ws + L.kvs, *P = ws + L.P, *M = ws + L.M, *o = ws + L.o;
    const float *y1 = ws + L.y1, *x1 = ws + L.x1, *h = ws + L.h, *u = ws + L.u, *y2 = ws + L.y2;
    float *dbin = gsmall, *dbo = dbin + 3 * D, *dg1 = dbo + D, *dbe1 = dg1 + D, *da1 = dbe1 + D, *db1 = da1 + 1;
    float *db2 = db1 + F, *dg2 = db2 + D, *dbe2 = dg2 + D, *da2 = dbe2 + D;
    const int64_t nch = (R + BLOCK_CHUNK - 1) / BLOCK_CHUNK, nchk = (Rk + BLOCK_CHUNK - 1) / BLOCK_CHUNK;
    const int64_t wq = self ? 3 * D : D;
    int64_t np = nch * (3 * D + 1 > F ? 3 * D + 1 : F);  /* the LayerNorm, GELU and bias partial sums */
    if (nchk * 2 * D > np) np = nchk * 2 * D;
    float *dy = falloc(R * D), *dx1 = falloc(R * D), *dh = falloc(R * F), *dO = falloc(R * D);
    float *gq = falloc(R * wq), *gkv = self ? NULL : falloc(Rk * 2 * D), *W = falloc(3 * D * D);
    float *part = falloc(np);
    if (!dy || !dx1 || !dh || !dO || !gq || (!self && !gkv) || !W || !part) {
        free(dy); free(dx1); free(dh); free(dO); free(gq); free(gkv); free(W); free(part);
        return 1;
    }
    /* second residual and the feed-forward */
    resnorm_bwd_sums(go, ws + L.z2, y2, w[14], ws + L.mean2, ws + L.rstd2, w[15], R, D, a2, thr[2], fl[4], sd[2], dx1,
                     dy, part, dg2, dbe2, db2, da2, nthreads);
    MM(1, 0, D, F, R, dy, D, u, F, 0.0f, gw2, F);
    MM(0, 0, R, F, D, dy, D, w[13], F, 0.0f, dh, F);
    timemae_gelu_bias(h, w[12], dh, dh, part, R, F, BLOCK_CHUNK, nthreads);
    chunk_sum(part, nch, F, db1);
    MM(1, 0, F, D, R, dh, F, x1, D, 0.0f, gw1, D);
    MM(0, 0, R, D, F, dh, F, w[11], D, 1.0f, dx1, D);
    /* first residual, the output projection and the attention core */
    resnorm_bwd_sums(dx1, ws + L.z1, y1, w[7], ws + L.mean1, ws + L.rstd1, w[8], R, D, a1, thr[1], fl[3], sd[1], dx, dy,
                     part, dg1, dbe1, dbo, da1, nthreads);
    MM(1, 0, D, D, R, dy, D, o, D, 0.0f, gwo, D);
    MM(0, 0, R, D, D, dy, D, w[6], D, 0.0f, dO, D);
    const float scale = (float)(1.0 / sqrt((double)Dh));
    if (self) {
        timemae_attn_bwd(dO, qs, N * 3 * D, 3 * D, qs + D, N * 3 * D, 3 * D, qs + 2 * D, N * 3 * D, 3 * D, P, M,
                         B, H, N, Nk, Dh, scale, gq, N * 3 * D, 3 * D, gq + D, N * 3 * D, 3 * D, gq + 2 * D,
                         N * 3 * D, 3 * D, nthreads);
        stack(W, w[0], w[2], w[4], D * D);
        MM(1, 0, 3 * D, D, R, gq, 3 * D, x, D, 0.0f, gw_in, D);
        colsum(gq, R, 3 * D, 3 * D, dbin, part, nthreads);
        MM(0, 0, R, D, 3 * D, gq, 3 * D, W, D, 1.0f, dx, D);
    } else {
        timemae_attn_bwd(dO, qs, N * D, D, kvs, Nk * 2 * D, 2 * D, kvs + D, Nk * 2 * D, 2 * D, P, M, B, H, N, Nk,
                         Dh, scale, gq, N * D, D, gkv, Nk * 2 * D, 2 * D, gkv + D, Nk * 2 * D, 2 * D, nthreads);
        stack(W, w[2], w[4], NULL, D * D);
        MM(1, 0, D, D, R, gq, D, x, D, 0.0f, gw_in, D);
        colsum(gq, R, D, D, dbin, part, nthreads);
        MM(0, 0, R, D, D, gq, D, w[0], D, 1.0f, dx, D);
        MM(1, 0, 2 * D, D, Rk, gkv, 2 * D, kv, D, 0.0f, gw_in + D * D, D);
        colsum(gkv, Rk, 2 * D, 2 * D, dbin + D, part, nthreads);
        MM(0, 0, Rk, D, 2 * D, gkv, 2 * D, W, D, 0.0f, dkv, D);
    }
    free(dy); free(dx1); free(dh); free(dO); free(gq); free(gkv); free(W); free(part);
    return 0;
}
"""

_P = ctypes.c_void_p
_I = ctypes.c_int64


class CpuFusedError(CKernelError):
    """The fused CPU kernels were required (``TIMEMAE_CPU_FUSED=on``) and are unavailable."""


def _setup(lib) -> None:
    if not lib.timemae_attn_supported():
        raise CpuFusedError("this CPU lacks AVX-512 (F, DQ, BW, VL), which the kernel is written for")
    lib.timemae_attn_fwd.argtypes = [_P, _I, _I, _P, _I, _I, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float,
                                     ctypes.c_int32, ctypes.c_float, _P, _P, _P, _P, ctypes.c_int32]
    lib.timemae_attn_fwd.restype = None
    lib.timemae_attn_bwd.argtypes = [_P, _P, _I, _I, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I, _I,
                                     ctypes.c_float, _P, _I, _I, _P, _I, _I, _P, _I, _I, ctypes.c_int32]
    lib.timemae_attn_bwd.restype = None
    lib.timemae_resnorm_fwd.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float, ctypes.c_int32, ctypes.c_float, _P, _P,
                                        _P, ctypes.c_float, _P, _P, _P, _P, ctypes.c_int32]
    lib.timemae_resnorm_fwd.restype = None
    lib.timemae_resnorm_bwd.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I, _I, ctypes.c_float, ctypes.c_int32,
                                        ctypes.c_float, _P, _P, _P, _P, _I, ctypes.c_int32]
    lib.timemae_resnorm_bwd.restype = None
    lib.timemae_gelu.argtypes = [_P, _P, _P, _I, ctypes.c_int32]
    lib.timemae_gelu.restype = None
    lib.timemae_gelu_bias.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int32]
    lib.timemae_gelu_bias.restype = None
    lib.timemae_gumbel_argmax.argtypes = [_P, _I, _I, _P, _P, _P, ctypes.c_int32]
    lib.timemae_gumbel_argmax.restype = None
    lib.timemae_block_set_sgemm.argtypes = [_P]
    lib.timemae_block_set_sgemm.restype = None
    lib.timemae_block_mm.argtypes = [ctypes.c_int32, ctypes.c_int32, _I, _I, _I, _P, _I, _P, _I, ctypes.c_float, _P, _I]
    lib.timemae_block_mm.restype = None
    lib.timemae_block_ws_size.argtypes = [_P]
    lib.timemae_block_ws_size.restype = _I
    lib.timemae_block_fwd.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32]
    lib.timemae_block_fwd.restype = ctypes.c_int32
    lib.timemae_block_bwd.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32]
    lib.timemae_block_bwd.restype = ctypes.c_int32


# -fopenmp first (one thread pool: torch's libgomp, see the module docstring); without OpenMP the
# kernels run on one thread.
KERNEL = CKernel("fused", _ENV, _SOURCE, "fused CPU", setup=_setup,
                 flag_sets=(["-fopenmp"], ["-fopenmp-simd"]), error=CpuFusedError)


def mode() -> str:
    return KERNEL.mode()


def effective_mode(configured: str) -> str:
    """The mode a run uses: ``$TIMEMAE_CPU_FUSED`` where set, else ``configured``
    (``trainer.cpu_fused``). Raises :class:`CpuFusedError` naming a bad value."""
    return KERNEL.effective_mode(configured, "trainer.cpu_fused")


def available(m: Optional[str] = None) -> bool:
    """Whether the kernel is in use under mode ``m`` (default: ``$TIMEMAE_CPU_FUSED``); builds it
    if needed. Under ``on`` an unavailable kernel raises :class:`CpuFusedError`."""
    return KERNEL.available(m)


def describe(model_config=None) -> str:
    """One line for logs: which path this process runs for the fused kernels, and why; with a
    model config (:class:`timemae_dist.model.config.TimeMAEConfig`), which of them that model's
    pretraining blocks fit (head width, visible windows as keys, masked ones as queries, width)."""
    line = KERNEL.describe("fused CPU kernels (attention core, residual LayerNorm, GELU, codeword draw)", "eager torch ops")
    if KERNEL.mode() == "off" or KERNEL.lib is None:
        return line
    from timemae_dist.kernels import cpu_block  # imports this module

    line = f"{line}; blocks: {cpu_block.one_call_status()[1]}"
    if model_config is None:
        return line
    head = model_config.d_model // model_config.num_heads
    keys, queries = model_config.num_visible, model_config.num_masked
    misfit = []
    if not (head in HEAD_DIMS and keys <= MAX_KEYS and max(keys, queries) <= MAX_QUERIES):
        misfit.append(f"attention eager (heads {head} wide, {keys} visible windows as keys, {queries} masked as "
                      f"queries; the kernel takes heads {'/'.join(map(str, HEAD_DIMS))} wide, <= {MAX_KEYS} keys, "
                      f"<= {MAX_QUERIES} queries)")
    if model_config.d_model % 16 or model_config.d_model > MAX_WIDTH:
        misfit.append(f"residual LayerNorm eager (d_model {model_config.d_model}; the kernel takes multiples of 16 "
                      f"up to {MAX_WIDTH})")
    return line if not misfit else f"{line}; this model: {'; '.join(misfit)}"


def is_zero3_partition(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id``): its full
    data exists only inside the owning module's forward, gathered by DeepSpeed's per-module hooks,
    which the fused paths (:mod:`timemae_dist.kernels.cpu_block`, the matmul patch embedding) bypass."""
    return hasattr(param, "ds_id")


def library_path() -> Path:
    return KERNEL.library_path()


def build() -> Path:
    return KERNEL.build()


def applies(x: torch.Tensor, num_keys: int, head_dim: int) -> bool:
    """Whether an attention of input ``x`` over ``num_keys`` keys with ``head_dim``-wide heads runs
    fused: float32 CPU tensors, no autocast, at most :data:`MAX_KEYS` keys, :data:`MAX_QUERIES`
    queries and a head width in :data:`HEAD_DIMS`, the kernel available."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or num_keys > MAX_KEYS or head_dim not in HEAD_DIMS
            or x.shape[1] > MAX_QUERIES or torch.is_autocast_enabled("cpu")):
        return False
    return KERNEL.usable("the eager attention")


@functools.lru_cache(maxsize=64)
def _keep(p: float) -> tuple[int, float]:
    """(keep threshold, 1 / keep probability) of dropout rate ``p``; cached (3 calls per block and step)."""
    from timemae_dist.model.layers import keep_threshold

    thr = keep_threshold(p)
    return thr, float((1 << 15) / thr)


def _layout(q_t: torch.Tensor, kv_t: Optional[torch.Tensor], D: int) -> list:
    """Pointer, batch stride and row stride of q, k and v inside the projection output(s) (or
    their gradients): ``q|k|v`` in one ``(B, N, 3 * D)`` tensor when ``kv_t`` is None, else
    ``q`` ``(B, Q, D)`` and ``k|v`` ``(B, K, 2 * D)``; the kernels' argument order."""
    parts = ((q_t, 3 * D, 0), (q_t, 3 * D, D), (q_t, 3 * D, 2 * D)) if kv_t is None else (
        (q_t, D, 0), (kv_t, 2 * D, 0), (kv_t, 2 * D, D))
    args = []
    for t, row_stride, offset in parts:
        args += [t.data_ptr() + t.element_size() * offset, t.stride(0), row_stride]
    return args


def _attn_dims(q_src: torch.Tensor, kv_src: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """``(D, Q, K)`` of an attention's projection output(s) (see :func:`_layout`)."""
    if kv_src is None:
        return q_src.shape[-1] // 3, q_src.shape[1], q_src.shape[1]
    return q_src.shape[-1], q_src.shape[1], kv_src.shape[1]


def attn_forward(q_src: torch.Tensor, kv_src: Optional[torch.Tensor], num_heads: int, p: float, training: bool,
                 grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The attention core's forward on contiguous projection output(s) (no autograd): ``(out, P, M)``,
    ``out`` (B, Q, D); the probabilities ``P`` and dropout mask ``M`` (B, H, Q, K) when ``grad``
    (the backward's inputs), else None. Draws one seed from torch's generator when dropping out."""
    B = q_src.shape[0]
    D, Q, K = _attn_dims(q_src, kv_src)
    Dh = D // num_heads
    dropout = training and p > 0.0
    thr, dscale = _keep(p) if dropout else (0, 1.0)
    seed = torch.empty(1, dtype=torch.int64).random_() if dropout else torch.zeros(1, dtype=torch.int64)
    out = torch.empty(B, Q, D, dtype=torch.float32)
    P = torch.empty(B, num_heads, Q, K, dtype=torch.float32) if grad else None
    M = torch.empty(B, num_heads, Q, K, dtype=torch.float32) if grad else None
    KERNEL.lib.timemae_attn_fwd(*_layout(q_src, kv_src, D), B, num_heads, Q, K, Dh, Dh**-0.5, thr, dscale,
                                seed.data_ptr(), out.data_ptr(), P.data_ptr() if grad else None,
                                M.data_ptr() if grad else None, torch.get_num_threads())
    return out, P, M


def attn_backward(grad_out: torch.Tensor, q_src: torch.Tensor, kv_src: Optional[torch.Tensor], P: torch.Tensor,
                  M: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`attn_forward` w.r.t. its projection output(s): ``(dq_src, dkv_src)``
    (``dkv_src`` None for self-attention), laid out like ``q_src`` / ``kv_src``."""
    B = q_src.shape[0]
    D, Q, K = _attn_dims(q_src, kv_src)
    go = grad_out.contiguous()
    gq = torch.empty_like(q_src)
    gkv = None if kv_src is None else torch.empty_like(kv_src)
    Dh = D // num_heads
    KERNEL.lib.timemae_attn_bwd(go.data_ptr(), *_layout(q_src, kv_src, D), P.data_ptr(), M.data_ptr(), B, num_heads,
                                Q, K, Dh, Dh**-0.5, *_layout(gq, gkv, D), torch.get_num_threads())
    return gq, gkv


class _AttentionCore(torch.autograd.Function):
    """``(q_src, kv_src)`` -> ``o`` (B, Q, H * Dh). ``kv_src is None``: ``q_src`` is the
    self-attention's ``(B, N, 3 * D)`` q|k|v; else ``q_src`` (B, Q, D), ``kv_src`` (B, K, 2 * D)."""

    @staticmethod
    def forward(ctx, q_src, kv_src, num_heads: int, p: float, training: bool):
        grad = any(ctx.needs_input_grad[:2])
        out, P, M = attn_forward(q_src, kv_src, num_heads, p, training, grad)
        if grad:
            ctx.save_for_backward(q_src, kv_src, P, M)
            ctx.num_heads = num_heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_src, kv_src, P, M = ctx.saved_tensors
        gq, gkv = attn_backward(grad_out, q_src, kv_src, P, M, ctx.num_heads)
        return gq, gkv, None, None, None


def attention_core(q_src: torch.Tensor, kv_src: Optional[torch.Tensor], num_heads: int, p: float,
                   training: bool) -> torch.Tensor:
    """Fused attention core (see the module docstring); inputs must be contiguous float32 CPU
    tensors and :func:`applies` true. ``kv_src=None``: self-attention on ``(B, N, 3 * D)``."""
    q_src = q_src.contiguous()
    kv_src = None if kv_src is None else kv_src.contiguous()
    return _AttentionCore.apply(q_src, kv_src, num_heads, p, training)


# --------------------------------------------------------------------------------------------
# post-LN residual: LayerNorm(x + a * mask * y)

MAX_WIDTH = 1024
_CHUNK = 64  # rows per partial sum of the LayerNorm/scale gradients (fixed: thread-count independent)


def applies_residual(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``LayerNorm(x + a * dropout(y))`` of these inputs runs fused: float32 CPU tensors of
    one shape whose last dimension is a multiple of 16 up to :data:`MAX_WIDTH`, no autocast, the
    kernel available."""
    D = x.shape[-1]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or y.dtype != torch.float32 or x.shape != y.shape
            or D % 16 or D > MAX_WIDTH or torch.is_autocast_enabled("cpu")):
        return False
    return KERNEL.usable("the eager residual LayerNorm")


def resnorm_forward(x: torch.Tensor, y: torch.Tensor, a_val: float, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, p: float, grad: bool,
                    y_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[tuple]]:
    """``LayerNorm(x + a_val * mask * (y + y_bias))`` of contiguous ``(..., D)`` tensors (``y_bias`` a
    (D,) bias, None for none; no autograd): ``(out, saved)``, ``saved`` what :func:`resnorm_backward`
    needs (None unless ``grad``). Draws one seed from torch's generator when ``p > 0``."""
    D = x.shape[-1]
    N = x.numel() // D
    dropout = p > 0.0
    thr, dscale = _keep(p) if dropout else (0, 1.0)
    seed = torch.empty(1, dtype=torch.int64).random_() if dropout else torch.zeros(1, dtype=torch.int64)
    out = torch.empty_like(x)
    z = torch.empty_like(x) if grad else None
    mean = torch.empty(N, dtype=torch.float32) if grad else None
    rstd = torch.empty(N, dtype=torch.float32) if grad else None
    KERNEL.lib.timemae_resnorm_fwd(x.data_ptr(), y.data_ptr(), _ptr(y_bias), N, D, a_val, thr, dscale,
                                   seed.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps, out.data_ptr(), _ptr(z),
                                   _ptr(mean), _ptr(rstd), torch.get_num_threads())
    return out, ((y, y_bias, weight, z, mean, rstd, seed), (N, D, a_val, thr, dscale)) if grad else None


def resnorm_backward(grad_out: torch.Tensor, saved: tuple, need_dy: bool = True):
    """Gradients of :func:`resnorm_forward`: ``(dx, dy, da, dweight, dbias, dy_bias)`` (``dy`` None
    unless ``need_dy``; ``da`` a (1,) tensor, the gradient of ``a_val``; ``dy_bias`` the rows' sum
    of ``dy``, the gradient of ``y_bias``)."""
    (y, y_bias, weight, z, mean, rstd, seed), (N, D, a_val, thr, dscale) = saved
    go = grad_out.contiguous()
    dx = torch.empty_like(go)
    dy = torch.empty_like(go) if need_dy else None
    nchunks = (N + _CHUNK - 1) // _CHUNK
    partial = torch.empty(nchunks, 3 * D + 1, dtype=torch.float32)
    KERNEL.lib.timemae_resnorm_bwd(go.data_ptr(), z.data_ptr(), y.data_ptr(), _ptr(y_bias), mean.data_ptr(),
                                   rstd.data_ptr(), weight.data_ptr(), N, D, a_val, thr, dscale, seed.data_ptr(),
                                   dx.data_ptr(), _ptr(dy), partial.data_ptr(), _CHUNK, torch.get_num_threads())
    sums = partial.sum(0)
    return dx, dy, sums[3 * D:].clone(), sums[:D].clone(), sums[D:2 * D].clone(), sums[2 * D:3 * D].clone()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _ResidualNorm(torch.autograd.Function):
    """``(x, y, a, weight, bias)`` -> ``LayerNorm(x + a * mask * y)``; ``a`` a (1,) parameter or
    None (the constant 1); the mask regenerated from its seed in the backward (not stored)."""

    @staticmethod
    def forward(ctx, x, y, a, weight, bias, eps: float, p: float):
        grad = any(ctx.needs_input_grad[:5])
        out, saved = resnorm_forward(x, y, 1.0 if a is None else float(a), weight, bias, eps, p, grad)
        if grad:
            ctx.save_for_backward(*saved[0])
            ctx.meta = saved[1]
            ctx.has_a = a is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dx, dy, da, dw, db, _ = resnorm_backward(grad_out, (ctx.saved_tensors, ctx.meta), ctx.needs_input_grad[1])
        return dx, dy, da if ctx.has_a else None, dw, db, None, None


def residual_norm(x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor], norm: torch.nn.LayerNorm,
                  p: float) -> torch.Tensor:
    """``norm(x + dropout(a * y, p))`` in one C pass each way (:func:`applies_residual` must hold);
    the dropout mask is the one ``keep_mask(y, p)`` draws (same seed draw, same stream)."""
    return _ResidualNorm.apply(x.contiguous(), y.contiguous(), a, norm.weight, norm.bias, float(norm.eps), float(p))


# --------------------------------------------------------------------------------------------
# GELU (exact form)


def applies_gelu(h: torch.Tensor) -> bool:
    """Whether ``F.gelu(h)`` (exact, erf form) runs fused: a float32 CPU tensor, no autocast, the
    kernel available."""
    if h.device.type != "cpu" or h.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    return KERNEL.usable("torch's GELU")


def gelu_forward(h: torch.Tensor) -> torch.Tensor:
    """``h * Phi(h)`` of a contiguous float32 tensor (no autograd)."""
    out = torch.empty_like(h)
    KERNEL.lib.timemae_gelu(h.data_ptr(), None, out.data_ptr(), h.numel(), torch.get_num_threads())
    return out


def gelu_backward(h: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`gelu_forward` at ``h`` times ``grad_out``."""
    g = grad_out.contiguous()
    dh = torch.empty_like(h)
    KERNEL.lib.timemae_gelu(h.data_ptr(), g.data_ptr(), dh.data_ptr(), h.numel(), torch.get_num_threads())
    return dh


def gelu_bias_forward(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``gelu(h + b)`` of a contiguous ``(rows, cols)`` float32 ``h`` and ``(cols,)`` ``b``, ``cols`` a
    multiple of 16 (no autograd)."""
    out = torch.empty_like(h)
    KERNEL.lib.timemae_gelu_bias(h.data_ptr(), b.data_ptr(), None, out.data_ptr(), None, h.shape[0], h.shape[1],
                                 _CHUNK, torch.get_num_threads())
    return out


def gelu_bias_backward(h: torch.Tensor, b: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`gelu_bias_forward`: ``(dh, db)`` (``db`` the rows' sum of ``dh``, over
    fixed row chunks)."""
    g = grad_out.contiguous()
    dh = torch.empty_like(h)
    rows, cols = h.shape
    partial = torch.empty((rows + _CHUNK - 1) // _CHUNK, cols, dtype=torch.float32)
    KERNEL.lib.timemae_gelu_bias(h.data_ptr(), b.data_ptr(), g.data_ptr(), dh.data_ptr(), partial.data_ptr(), rows,
                                 cols, _CHUNK, torch.get_num_threads())
    return dh, partial.sum(0)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(h)
        return gelu_forward(h)

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        return gelu_backward(h, grad_out)


def gelu(h: torch.Tensor) -> torch.Tensor:
    """``F.gelu(h)`` (exact form ``h * Phi(h)``; Phi to ~1e-7 absolute) in one C pass each way
    (:func:`applies_gelu` must hold)."""
    return _Gelu.apply(h.contiguous())


# ---------------------------------------------------------------------------------------------
# codewords: argmax of Gumbel-perturbed logits


def applies_gumbel(logits: torch.Tensor) -> bool:
    """Whether :func:`gumbel_argmax` draws the codewords of ``logits``: a float32 CPU tensor with a
    non-empty last dimension, the kernel available."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() < 1 or logits.shape[-1] == 0:
        return False
    return KERNEL.usable("torch's rand + log + argmax for the codewords")


def gumbel_argmax(logits: torch.Tensor, generator: Optional[torch.Generator] = None,
                  noise_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``argmax(logits + G, dim=-1)`` (int64, ``logits.shape[:-1]``), G standard Gumbel noise, in one
    C pass: no noise tensor, no separate rand/log/add/argmax passes (~10x faster on the forward's
    1152 x 192 codeword logits). Samples ``softmax(logits)`` per row, as the eager draw
    (:func:`timemae_dist.model.timemae.gumbel_noise`) does; a different random stream (counter-based,
    one seed drawn from ``generator``, default torch's, so ``torch.manual_seed`` and checkpointed
    RNG states determine it); independent of the thread count. ``noise_out`` (float32, contiguous,
    ``logits``' shape): also receives G (tests). :func:`applies_gumbel` must hold."""
    x = logits.contiguous()
    if noise_out is not None and (noise_out.shape != x.shape or noise_out.dtype != torch.float32
                                  or not noise_out.is_contiguous()):
        raise ValueError("gumbel_argmax: noise_out must be a contiguous float32 tensor of the logits' shape")
    K = x.shape[-1]
    rows = x.numel() // K
    seed = torch.empty(1, dtype=torch.int64).random_(generator=generator)
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    KERNEL.lib.timemae_gumbel_argmax(x.data_ptr(), rows, K, seed.data_ptr(), out.data_ptr(),
                                     None if noise_out is None else noise_out.data_ptr(), torch.get_num_threads())
    return out
