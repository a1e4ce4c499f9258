"""bench_pretrain's report over repeated runs (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_pretrain  # noqa: E402


def _run(wps: float, wait: float = 0.01) -> dict:
    return {"steady_windows_per_s": wps, "data_wait_fraction": wait, "windows_per_s": wps * 0.9}


def test_summarize_takes_medians_and_pairs_rounds():
    one = [_run(1800), _run(2100, 0.02), _run(1950)]
    two = [_run(2000), _run(2500), _run(1950, 0.03)]
    res = bench_pretrain.summarize(one, two)
    assert res["one_worker"] == 1950 and res["two_workers"] == 2000
    assert res["runs"] == {"one_worker": [1800, 2100, 1950], "two_workers": [2000, 2500, 1950]}
    # each round's ratio first (the machine drifts between rounds), then their median
    assert res["ratio"] == pytest.approx(sorted([2000 / 1800, 2500 / 2100, 1.0])[1])
    assert res["data_wait_fraction"] == {"one_worker": 0.01, "two_workers": 0.01}


def test_summarize_one_run_is_that_run():
    res = bench_pretrain.summarize([_run(1900)], [_run(2300)])
    assert res["one_worker"] == 1900 and res["two_workers"] == 2300 and res["ratio"] == pytest.approx(2300 / 1900)


def test_repeat_must_be_positive(capsys):
    with pytest.raises(SystemExit, match="--repeat must be >= 1"):
        bench_pretrain.main(["--repeat", "0"])
