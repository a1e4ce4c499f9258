"""timemae_dist.hostinfo: which CPU a benchmark figure was measured on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from timemae_dist.hostinfo import amd_uarch, cpu_info, describe_cpu

REPO = Path(__file__).resolve().parents[2]


def _cpuinfo(vendor: str, family: int, model: int, name: str, flags: str) -> str:
    block = (f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {name}\nstepping\t: 1\nflags\t\t: {flags}\n\n")
    return block.format(0) + block.replace(name, "other").format(1)  # only the first block counts


def test_amd_generations():
    assert amd_uarch(0x19, 0x11) == "Zen 4"  # Genoa
    assert amd_uarch(0x19, 0x01) == "Zen 3"  # Milan
    assert amd_uarch(0x19, 0x61) == "Zen 4"  # Raphael
    assert amd_uarch(0x1A, 0x02) == "Zen 5"  # Turin
    assert amd_uarch(0x17, 0x31) == "Zen 2"  # Rome
    assert amd_uarch(0x17, 0x01) == "Zen/Zen+"
    assert amd_uarch(0x15, 0x01) is None


def test_cpu_info_parses_the_first_processor():
    zen4 = cpu_info(_cpuinfo("AuthenticAMD", 25, 17, "AMD EPYC", "fpu sse avx2 avx512f avx512bw"))
    assert zen4 | {"logical_cpus": None} == {
        "vendor": "AuthenticAMD", "model_name": "AMD EPYC", "family": 25, "model": 17, "stepping": 1,
        "uarch": "Zen 4", "logical_cpus": None, "avx512": True}
    assert describe_cpu(zen4).startswith("AMD EPYC (Zen 4: family 25 model 17), ") and describe_cpu(zen4).endswith(
        ", AVX-512")
    intel = cpu_info(_cpuinfo("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480", "fpu avx2"))
    assert intel["uarch"] is None and intel["avx512"] is False and intel["family"] == 6
    assert describe_cpu(intel).startswith("Intel(R) Xeon(R) Platinum 8480 (family 6 model 143)")
    empty = cpu_info("")
    assert empty["vendor"] is None and empty["family"] is None and empty["avx512"] is None
    assert "unknown CPU" in describe_cpu(empty) or empty["model_name"]


def test_module_prints_this_machine():
    proc = subprocess.run([sys.executable, "-m", "timemae_dist.hostinfo"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    line, js = proc.stdout.strip().splitlines()
    info = json.loads(js)
    assert info == cpu_info() and line == describe_cpu(info)
