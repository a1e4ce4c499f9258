"""The console line's ETA: right on the first log line and averaged from there on."""

from __future__ import annotations

import time

from timemae_dist.train.metrics import MetricsWriter


def test_eta_first_line_uses_step_time_then_measured_mean():
    w = MetricsWriter(None, total_steps=1000, console=False)
    # first log line (step 100): nothing measured yet by the writer -> the window's mean step time
    w.log(100, {"time/step_ms": 50.0})
    assert abs(w.eta_seconds(100, {"time/step_ms": 50.0}) - 900 * 0.05) < 1e-9
    assert "eta 0:00:45" in w.format_line(100, {"time/step_ms": 50.0})
    time.sleep(0.2)
    # 100 steps later: the measured wall time per step since the first log line (~2 ms)
    eta = w.eta_seconds(200, {"time/step_ms": 50.0})
    per_step = eta / 800
    assert 0.002 <= per_step < 0.02, per_step
    assert w.eta_seconds(1000, {}) == 0.0


def test_eta_unknown_without_step_time():
    w = MetricsWriter(None, total_steps=10, console=False)
    assert "eta ?" in w.format_line(1, {})
