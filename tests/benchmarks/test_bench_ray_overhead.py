"""bench_ray_overhead's /proc accounting (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_ray_overhead  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_attribute_splits_training_threads_process_and_others():
    tick = os.sysconf("SC_CLK_TCK")
    train, other, other2, me = 100, 200, 300, 400
    before = {(train, 1): (0, 0, 0), (train, 2): (0, 0, 0), (train, 3): (0, 0, 0),
              (other, 1): (0, 0, 0), (other, 2): (0, 0, 0), (other2, 1): (0, 0, 0), (me, 1): (0, 0, 0)}
    after = {
        (train, 1): (2 * tick, 5, 600),  # the two busiest threads of the training process
        (train, 2): (2 * tick, 1, 400),
        (train, 3): (tick // 10, 50, 0),  # its third thread: "other threads of the training process"
        (other, 1): (tick // 10, 300, 10),
        (other, 2): (0, 100, 0),
        (other2, 1): (0, 20, 0),
        (me, 1): (5 * tick, 999, 999),  # the benchmark itself: skipped
        (500, 1): (tick, 1, 1),  # started inside the window: not in both snapshots, not counted
    }
    names = {train: "ray::RayTrainWorker", other: "ray::TrainController", other2: "raylet", me: "bench"}
    res = bench_ray_overhead.attribute(before, after, names, 2.0, train, {me})
    t = res["training_threads"]
    assert t["cpu_percent"] == pytest.approx(200.0)
    assert t["involuntary_per_s"] == pytest.approx(500.0) and t["voluntary_per_s"] == pytest.approx(3.0)
    o = res["training_process_other"]
    assert o["cpu_percent"] == pytest.approx((tick // 10) / tick / 2 * 100) and o["wakeups_per_s"] == pytest.approx(25.0)
    x = res["other_processes"]
    assert x["wakeups_per_s"] == pytest.approx((310 + 100 + 20) / 2) and x["processes"] == 2
    assert [row[0] for row in x["top"]] == ["ray::TrainController", "raylet"]
    assert x["top"][0][1] == pytest.approx(205.0)


def test_snapshot_sees_a_busy_thread_of_this_process():
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        before = bench_ray_overhead.snapshot()
        time.sleep(0.5)
        after = bench_ray_overhead.snapshot()
    finally:
        stop.set()
        worker.join()
    me = os.getpid()
    assert bench_ray_overhead._name(me) and (me, worker.native_id) in before and (me, worker.native_id) in after
    ticks = after[(me, worker.native_id)][0] - before[(me, worker.native_id)][0]
    assert ticks > 0
