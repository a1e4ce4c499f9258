"""What CPU a figure was measured on: vendor, model name, family/model, microarchitecture.

Cloud VMs of "the same kind" land on different CPU generations from one day to the next (an AMD
EPYC VM was a Zen 5 one day and a Zen 4 the next, with half the fp32 GEMM throughput), and a
model name such as ``AMD EPYC`` does not tell them apart. Benchmarks put :func:`cpu_info` into
their output so every windows/s figure says which CPU produced it.

    python -m timemae_dist.hostinfo        # one JSON line
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Optional

__all__ = ["cpu_info", "cpuinfo_fields", "amd_uarch", "describe_cpu"]


def amd_uarch(family: int, model: int) -> Optional[str]:
    """AMD's microarchitecture for a CPUID family/model, where it is known (None elsewhere).

    Zen 4 runs 512-bit AVX-512 instructions as two 256-bit halves; Zen 5 (server parts) runs them
    at full width, which is why oneMKL's AVX-512 kernels gain ~2x over its AVX2 ones on Zen 5 and
    much less on Zen 4 (see timemae_dist/mkl_avx512.py).
    """
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen/Zen+"
    if family == 0x19:
        if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF:
            return "Zen 4"
        return "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def cpuinfo_fields(text: Optional[str] = None) -> dict[str, str]:
    """The key/value pairs of the first processor block of /proc/cpuinfo (``text``: its contents;
    read from the machine when None, ``{}`` where it cannot be read)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def cpu_info(cpuinfo_text: Optional[str] = None) -> dict:
    """``{"vendor", "model_name", "family", "model", "stepping", "uarch", "logical_cpus", "avx512"}``.

    ``cpuinfo_text``: /proc/cpuinfo's text (read from the machine when None; tests pass their own).
    Fields that cannot be read are None (non-Linux, or a cpuinfo without them).
    """
    info = cpuinfo_fields(cpuinfo_text)

    def _int(key: str) -> Optional[int]:
        try:
            return int(info[key], 0)
        except (KeyError, ValueError):
            return None

    vendor = info.get("vendor_id")
    family, model = _int("cpu family"), _int("model")
    uarch = None
    if vendor == "AuthenticAMD" and family is not None and model is not None:
        uarch = amd_uarch(family, model)
    flags = set(info.get("flags", "").split())
    return {
        "vendor": vendor,
        "model_name": info.get("model name") or platform.processor() or None,
        "family": family,
        "model": model,
        "stepping": _int("stepping"),
        "uarch": uarch,
        "logical_cpus": os.cpu_count(),
        "avx512": "avx512f" in flags if flags else None,
    }


def describe_cpu(info: Optional[dict] = None) -> str:
    """One line, e.g. ``AMD EPYC (Zen 4: family 25 model 17), 2 logical CPUs, AVX-512``."""
    i = cpu_info() if info is None else info
    name = i["model_name"] or i["vendor"] or "unknown CPU"
    ident = []
    if i["uarch"]:
        ident.append(i["uarch"])
    if i["family"] is not None and i["model"] is not None:
        ident.append(f"family {i['family']} model {i['model']}")
    text = name + (f" ({': '.join(ident)})" if ident else "")
    text += f", {i['logical_cpus']} logical CPUs"
    if i["avx512"] is not None:
        text += ", AVX-512" if i["avx512"] else ", no AVX-512"
    return text


if __name__ == "__main__":
    print(describe_cpu())
    print(json.dumps(cpu_info()))
