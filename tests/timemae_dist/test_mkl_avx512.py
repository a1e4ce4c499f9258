"""oneMKL's AVX-512 kernels on AMD CPUs: detection, the preload library, numerics, the CLI re-exec.

The speed-up itself is measured in benchmarks/bench_gemm.py and bench_pretrain.py, not here.
Tests that need the override to apply (an AMD CPU with AVX-512, PyTorch with MKL, a C compiler)
skip elsewhere; the reference machine is one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from timemae_dist import mkl_avx512 as mk

REPO = Path(__file__).resolve().parents[2]
APPLIES = mk.support().applies
needs_amd = pytest.mark.skipif(
    not APPLIES or mk._compiler() is None,
    reason=f"override does not apply here ({mk.support().reason}) or no C compiler to build it",
)

# GEMMs of the shapes TimeMAE trains with, then one training step of a small TimeMAE; saved to npz.
PROBE = r"""
import json, sys
import numpy as np, torch
from timemae_dist.mkl_avx512 import status
from timemae_dist.model import TimeMAE, TimeMAEConfig
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
out = {}
for n, k, m in [(896, 64, 64), (896, 64, 256), (896, 256, 64), (64, 896, 64), (512, 512, 512)]:
    a, b = torch.randn(n, k, generator=g), torch.randn(k, m, generator=g)
    out[f"mm{n}x{k}x{m}"] = (a @ b).numpy()
a, b = torch.randn(128, 7, 16, generator=g), torch.randn(128, 16, 7, generator=g)
out["bmm"] = torch.bmm(a, b).numpy()
torch.manual_seed(0)
model = TimeMAE(TimeMAEConfig(in_channels=3, seq_len=64, wave_length=8, d_model=32, num_layers=2, num_heads=4,
                              reg_layers=1, vocab_size=16, dropout=0.0, reg_dropout=0.0))
target = model.detach_target_encoder()
x = torch.randn(16, 3, 64, generator=g)
res = model(x, target_encoder=target)
res["loss"].backward()
out["loss"] = res["loss"].detach().numpy()
out["grads"] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).numpy()
np.savez(sys.argv[1], **out)
print(json.dumps(status()))
"""


def _probe(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(out))


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TIMEMAE_CACHE_DIR", str(d))
    return d


def test_support_follows_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    amd = "AuthenticAMD" in text
    flags = next(ln for ln in text.splitlines() if ln.startswith("flags")).split()
    avx512 = all(f in flags for f in ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"))
    import torch

    assert mk.support().applies == (amd and avx512 and torch.backends.mkl.is_available()), mk.support()


def test_intel_or_no_avx512_is_left_alone(monkeypatch):
    monkeypatch.setattr(mk, "_cpuinfo", lambda: ("GenuineIntel", {"avx512f", "avx512bw"}))
    assert not mk.support().applies and "GenuineIntel" in mk.support().reason
    assert mk.worker_env("auto")[0] == {}
    with pytest.raises(mk.MklAvx512Error, match="does not apply here: CPU vendor GenuineIntel"):
        mk.worker_env("on")
    monkeypatch.setattr(mk, "_cpuinfo", lambda: ("AuthenticAMD", {"avx2", "fma"}))
    assert not mk.support().applies and "without avx512f" in mk.support().reason
    assert mk.worker_env("off") == ({}, "fp32 GEMM: oneMKL default dispatch (mkl_avx512=off)")
    with pytest.raises(mk.MklAvx512Error, match="'fast' is not one of auto|on|off"):
        mk.worker_env("fast")


@needs_amd
def test_build_is_cached_atomic_and_env_prepends(cache, monkeypatch):
    lib = mk.build_shim()
    assert lib.parent == cache and lib.is_file() and lib.name.startswith("libtimemae_mkl_avx512-")
    mtime = lib.stat().st_mtime_ns
    assert mk.build_shim() == lib and lib.stat().st_mtime_ns == mtime  # built once
    assert [p.name for p in cache.iterdir()] == [lib.name]  # no build folder left behind
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    env, note = mk.worker_env("auto")
    assert env == {"LD_PRELOAD": f"{lib} /opt/other.so"} and "AVX-512 path" in note


@needs_amd
def test_no_compiler_auto_falls_back_on_errors(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    env, note = mk.worker_env("auto")
    assert env == {} and "AVX2 path" in note and "no C compiler" in note
    with pytest.raises(mk.MklAvx512Error, match="no C compiler .* trainer.mkl_avx512=off"):
        mk.worker_env("on")
    assert not cache.exists() or not list(cache.iterdir())


@needs_amd
def test_preloaded_process_dispatches_avx512_with_matching_numerics(cache, tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    st0, ref = _probe(tmp_path, "avx2", base)
    env, _ = mk.worker_env("on")
    st1, fast = _probe(tmp_path, "avx512", {**base, **env})
    assert not st0["loaded"] and st1["loaded"]
    assert st1["mkl_cpu_code"] > st0["mkl_cpu_code"], (st0, st1)  # MKL switched kernels
    for key in ref:
        np.testing.assert_allclose(fast[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
    # a different kernel: equal to rounding, not bit for bit
    assert any(not np.array_equal(fast[k], ref[k]) for k in ref if k.startswith("mm"))


@needs_amd
def test_cli_reexecutes_itself_with_the_override(cache, tmp_path):
    import shutil

    store = tmp_path / "store"
    from data_pipeline.store import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(store, "arrow", ["a", "b"], 16, chunk_windows=16, shard_windows=64) as w:
        w.append("train", rng.standard_normal((32, 2, 16)).astype(np.float32), label=-1, subject=0, recording=0,
                 offset=0)
        w.finalize({"normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})
    timemae = shutil.which("timemae", path=str(Path(sys.executable).parent))
    assert timemae, "the timemae console script is installed next to this python"
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", mk.ENV_MODE, "TIMEMAE_MKL_AVX512_REEXEC")}

    def run(name: str, *over: str, entry: tuple[str, ...] = (timemae, "pretrain"), **extra: str):
        cmd = [*entry, "--single-process", str(REPO / "configs/pretrain/tiny.yaml"), f"data.store={store}",
               f"run.storage_path={tmp_path}", f"run.name={name}", "trainer.max_steps=1", "trainer.micro_batch_size=8",
               *over]
        return subprocess.run(cmd, cwd=REPO, env={**base, **extra}, capture_output=True, text=True, timeout=300)

    on = run("with")
    assert on.returncode == 0, on.stderr[-2000:]
    assert "fp32 GEMM: oneMKL AVX-512 path" in on.stdout and json.loads(on.stdout.splitlines()[-1])["steps"] == 1
    off = run("without", TIMEMAE_MKL_AVX512="off")
    assert off.returncode == 0 and "AVX2 path on an AVX-512 AMD CPU" in off.stdout
    bad = run("bad", TIMEMAE_MKL_AVX512="maybe")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: TIMEMAE_MKL_AVX512: 'maybe' is not one of auto|on|off"
    assert not (tmp_path / "bad").exists()
    # the config key decides for a process that trains itself: `timemae` preloads by default, off takes it out ...
    cfg_off = run("cfg_off", "trainer.mkl_avx512=off")
    assert cfg_off.returncode == 0, cfg_off.stderr[-2000:]
    assert "AVX2 path on an AVX-512 AMD CPU" in cfg_off.stdout and "AVX-512 path (MKL" not in cfg_off.stdout
    # ... and `python -m launch.pretrain --single-process` (no CLI re-exec) gets it from auto
    module = run("module", entry=(sys.executable, "-m", "launch.pretrain"))
    assert module.returncode == 0, module.stderr[-2000:]
    assert "fp32 GEMM: oneMKL AVX-512 path (MKL CPU code" in module.stdout
    assert json.loads(module.stdout.splitlines()[-1])["steps"] == 1
    module_off = run("module_off", "trainer.mkl_avx512=off", entry=(sys.executable, "-m", "launch.pretrain"))
    assert module_off.returncode == 0 and "AVX2 path on an AVX-512 AMD CPU" in module_off.stdout


def test_status_module_prints_json():
    proc = subprocess.run([sys.executable, "-m", "timemae_dist.mkl_avx512"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert set(st) == {"applies", "reason", "loaded", "mkl_cpu_code"} and st["applies"] == APPLIES
