"""The scaling model of bench/model.py recovers known parameters from points generated with them."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import model  # noqa: E402


def test_allreduce_fit_recovers_latency_and_bandwidth():
    true = {"alpha_s": 50e-6, "bandwidth_Bps": 2.5e9, "oversubscribed": {"alpha_s": 2e-3, "bandwidth_Bps": 0.3e9}}
    # 8 ranks on 4 cores: those points have their own (worse) latency and bandwidth.
    sweep = {str(p): {str(n): {"mpirt": [model.allreduce_time(true, p, n, cores=4)] * 3}
                      for n in (4096, 1 << 20, 1 << 26)} for p in (2, 4, 8)}
    fit, points = model.fit_allreduce({"results": {"sweep": sweep}}, cores=4)
    assert len(points) == 9
    for key in ("alpha_s", "bandwidth_Bps"):
        assert fit[key] == pytest.approx(true[key], rel=1e-6)
        assert fit["oversubscribed"][key] == pytest.approx(true["oversubscribed"][key], rel=1e-6)


def test_compute_fit_and_step_time_reproduce_the_one_rank_points():
    c, h, params = 40e-6, 2e-3, 100_000
    pts = [{"model": "m", "mode": mode, "ranks": 1, "global_batch": g, "params": params,
            "samples_per_s": [g / (c * g + h)]} for mode, g in (("strong", 256), ("weak", 64))]
    fit = model.fit_compute(pts)["m"]
    assert fit["c_s_per_sample"] == pytest.approx(c) and fit["h_s_per_step"] == pytest.approx(h)
    ar = {"alpha_s": 1e-4, "bandwidth_Bps": 1e9, "oversubscribed": {"alpha_s": 3e-4, "bandwidth_Bps": 1e9 / 3}}
    # 4 ranks on 2 cores: compute is shared, the allreduce of 4 x params bytes is added, oversubscribed.
    want = (c * 256 / 4 + h) * 2 + (2 * math.log2(4) * 3e-4 + 2 * 3 / 4 * 4 * params / (1e9 / 3)) \
        + 2 * math.log2(4) * 3e-4  # the Agree
    assert model.step_time(fit, ar, 4, 256, cores=2) == pytest.approx(want)
    weak = model.predict_efficiency(fit, ar, "weak", 64, [16, 1024])
    assert 0 < weak[1024] < weak[16] < 1


def test_compute_is_fitted_on_one_core_and_threads_speed_it_up():
    """The 1-rank runs on one core give c and h; the runs on every core (2 threads) give s_t, which the
    model applies to ranks with more than one thread, and not to the predictions at one rank per core."""
    c, h, params, s = 40e-6, 2e-3, 100_000, 1.5
    pts = [{"model": "m", "mode": mode, "ranks": 1, "global_batch": g, "params": params, "cores": 2,
            "threads": t, "one_core": t == 1, "samples_per_s": [g / ((c * g + h) / (s if t == 2 else 1.0))]}
           for mode, g in (("strong", 256), ("weak", 64)) for t in (1, 2)]
    fit = model.fit_compute(pts)["m"]
    assert fit["c_s_per_sample"] == pytest.approx(c) and fit["h_s_per_step"] == pytest.approx(h)
    assert fit["thread_speedup"] == pytest.approx(s) and fit["speedup_threads"] == 2
    ar = {"alpha_s": 1e-4, "bandwidth_Bps": 1e9}
    one = model.step_time(fit, ar, 1, 256, cores=2, threads=2)
    assert one == pytest.approx((c * 256 + h) / s)
    assert model.step_time(fit, ar, 1, 256, cores=2) == pytest.approx(c * 256 + h)  # one thread
    # 2 ranks on 2 cores get a thread each: the compute halves against one core, not against two threads.
    two = model.step_time(fit, ar, 2, 256, cores=2, threads=1)
    assert two > (c * 128 + h)


def test_recovery_fit_is_logarithmic_in_ranks():
    pts = [(p, 5.0 + 1.5 * math.log2(p)) for p in (2, 4, 8, 16)]
    fit = model.fit_recovery(pts)
    assert fit["r0_ms"] == pytest.approx(5.0) and fit["r1_ms_per_doubling"] == pytest.approx(1.5)
    assert model.recovery_ms(fit, 1024) == pytest.approx(20.0)
