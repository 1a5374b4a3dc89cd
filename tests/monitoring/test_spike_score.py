"""Spike score (docs/method.md §8) against hand-computed values; the online detector against offline.

Most series are built so the window statistics are exact by hand: an alternating +-1 history over
an even window has mean 0 and population std 1, so a value is a spike exactly when |y| >= 7.
"""

import math

import numpy as np
import pytest

from prores_megatron.monitoring.spike_score import (
    OnlineSpikeDetector,
    SpikeConfig,
    candidate_range,
    iter_decisions,
    spike_score,
)


def alternating(n):
    """y_t = (-1)^t for t = 1..n (as a list indexed from iteration 1)."""
    return [(-1.0) ** t for t in range(1, n + 1)]


def online(values, num_steps=None, first_iteration=1, config=SpikeConfig()):
    num_steps = first_iteration + len(values) - 1 if num_steps is None else num_steps
    det = OnlineSpikeDetector(num_steps, config, first_iteration=first_iteration)
    decisions = []
    for i, v in enumerate(values):
        d = det.update(first_iteration + i, v)
        if det._tally.is_candidate(first_iteration + i):
            decisions.append((first_iteration + i, d))
    return decisions, det.result()


def test_planted_spikes_window_4_by_hand():
    # N = 20: candidates t = 2..18 (0.1*20 = 2, 0.9*20 = 18). Window 4, min_history 4: t = 2, 3, 4
    # have 1, 2, 3 values of history -> skipped; t = 5..18 (14) are evaluated.
    y = alternating(20)
    y[10 - 1] = 10.0  # history t=6..9 = +1,-1,+1,-1: mean 0, std 1 -> |10| >= 7: spike
    y[15 - 1] = -8.0  # history t=11..14 = -1,+1,-1,+1: mean 0, std 1 -> 8 >= 7: spike
    # t = 11: history -1, 1, -1, 10 -> mean 2.25, std sqrt(82.75/4) = 4.548; |-1 - 2.25| < 31.8.
    # t = 16: history 1, -1, 1, -8 -> mean -1.75, std sqrt(54.75/4) = 3.700; |1 + 1.75| < 25.9.
    cfg = SpikeConfig(window=4, min_history=4)
    r = spike_score(y, config=cfg)
    assert (r.first_candidate, r.last_candidate) == (2, 18)
    assert (r.spikes, r.evaluated, r.skipped) == (2, 14, 3)
    assert r.spike_iterations == [10, 15]
    assert r.score == pytest.approx(100 * 2 / 14)  # 14.2857 %
    assert (r.window_used, r.window_max) == (4, 4)
    assert online(y, config=cfg)[1] == r


def test_threshold_is_inclusive_and_two_sided():
    cfg = SpikeConfig(window=4, min_history=4, start=0.0, end=1.0)
    for last, expected in ((7.0, True), (-7.0, True), (6.999, False), (-6.999, False)):
        decisions = dict(iter_decisions([1.0, -1.0, 1.0, -1.0, last], config=cfg))
        assert decisions[5] is expected, last
    # threshold 3: |3.5| >= 3 is a spike, |2.5| is not
    cfg3 = SpikeConfig(window=4, threshold=3.0, min_history=4, start=0.0, end=1.0)
    assert dict(iter_decisions([1.0, -1.0, 1.0, -1.0, 3.5], config=cfg3))[5] is True
    assert dict(iter_decisions([1.0, -1.0, 1.0, -1.0, 2.5], config=cfg3))[5] is False


def test_defaults_on_a_long_run_with_planted_spikes():
    # y = sin(0.1 t): over 1000 steps mean ~0, std ~0.707, so 7 std ~ 4.95 > any |y - mean| <= ~1.
    # Planted +20 at 300 (before the scored range), 1500, 2700, 3900 (inside, > 1000 steps apart
    # so no window holds two plants) and 4700 (after the range).
    N = 5000
    y = [math.sin(0.1 * t) for t in range(1, N + 1)]
    for t in (300, 1500, 2700, 3900, 4700):
        y[t - 1] += 20.0
    r = spike_score(y)
    # Candidates 500..4500 (4001); t = 500 has 499 values of history >= 100: all evaluated.
    assert (r.first_candidate, r.last_candidate, r.evaluated, r.skipped) == (500, 4500, 4001, 0)
    assert r.spike_iterations == [1500, 2700, 3900]
    assert r.score == pytest.approx(300 / 4001)  # 0.07498 %
    assert (r.window_used, r.window_max) == (499, 1000)


def test_short_runs_use_the_available_history():
    # N = 150: candidates 15..135; t needs t-1 >= 100 values -> evaluated 101..135 (35), skipped 86.
    r = spike_score(alternating(150))
    assert (r.first_candidate, r.last_candidate) == (15, 135)
    assert (r.evaluated, r.skipped, r.spikes) == (35, 86, 0)
    assert (r.window_used, r.window_max) == (100, 134)
    assert r.score == 0.0
    # N = 20: nothing has 100 values of history: no score at all (not 0 %).
    r = spike_score(alternating(20))
    assert (r.score, r.evaluated, r.skipped, r.window_used) == (None, 0, 17, 0)
    assert spike_score([]).score is None


def test_candidate_range_uses_exact_decimals():
    # float: 0.1 * 30 = 3.0000000000000004 would drop t = 3.
    assert candidate_range(30, SpikeConfig()) == (3, 27)
    assert candidate_range(10, SpikeConfig()) == (1, 9)
    assert candidate_range(10, SpikeConfig(start=0.25, end=0.75)) == (3, 7)  # 2.5 -> 3, 7.5 -> 7
    assert candidate_range(100000, SpikeConfig()) == (10000, 90000)


def test_non_finite_values_are_spikes_and_stay_out_of_the_window():
    cfg = SpikeConfig(window=4, min_history=3)
    y = alternating(30)
    y[8 - 1] = float("nan")
    y[20 - 1] = float("inf")
    y[24 - 1] = None  # a value not logged that iteration counts like a non-finite one
    d = dict(iter_decisions(y, config=cfg))  # candidates 3..27
    assert d[8] is True and d[20] is True and d[24] is True
    # t = 9: history t=5..8 has 3 finite values (-1, 1, -1: mean -1/3, std 0.943); y = -1 -> no.
    assert d[9] is False
    r = spike_score(y, config=cfg)
    assert r.spike_iterations == [8, 20, 24] and r.window_used == 3
    # With min_history 4 the steps whose window holds the NaN are skipped (t = 9..12), but the
    # non-finite values themselves still count.
    r4 = spike_score(y, config=SpikeConfig(window=4, min_history=4))
    assert r4.spike_iterations == [8, 20, 24]
    # Skipped: t = 3, 4 (2 and 3 values); 9..12 (window holds the NaN); 21..23 (the inf; 24 is
    # itself missing, so a spike); 25..27 (the missing value; candidates end at 27).
    assert r4.skipped == 2 + 4 + 3 + 3


def test_diverged_run_scores_every_nan_step():
    # Smooth until 199, NaN from 200 on (N = 400, window 50): candidates 40..360 (321 steps);
    # t < 200 are not spikes (|y - mean| < 7 std on a line), t = 200..360 (161) are.
    y = [0.01 * t for t in range(1, 200)] + [float("nan")] * 201
    r = spike_score(y, config=SpikeConfig(window=50, min_history=10))
    assert (r.spikes, r.evaluated) == (161, 321)
    assert r.score == pytest.approx(100 * 161 / 321)


def test_constant_history_flags_only_a_change():
    cfg = SpikeConfig(window=10, min_history=5, start=0.0, end=1.0)
    assert spike_score([2.0] * 50, config=cfg).spikes == 0  # std 0 and no deviation
    y = [2.0] * 50
    y[29] = 2.0 + 1e-9  # std 0, deviation > 0: a jump out of a flat line
    assert spike_score(y, config=cfg).spike_iterations == [30]


@pytest.mark.parametrize("cfg,first", [
    (SpikeConfig(), 1),
    (SpikeConfig(window=37, threshold=2.5, min_history=11, start=0.05, end=0.95), 1),
    (SpikeConfig(window=25, threshold=3.0, min_history=25, start=0.0, end=1.0), 17),
])
def test_online_equals_offline(cfg, first):
    rng = np.random.default_rng(7)
    y = list(np.cumsum(rng.normal(size=3000)) * 0.01 + rng.standard_t(2, size=3000))
    for i in rng.choice(3000, size=40, replace=False):
        y[i] += float(rng.choice([-1, 1]) * rng.uniform(5, 50))
    for i, bad in zip(rng.choice(3000, size=6, replace=False), (math.nan, math.inf, -math.inf, None, math.nan, 0.0)):
        y[i] = bad
    offline_decisions = list(iter_decisions(y, first_iteration=first, config=cfg))
    online_decisions, online_result = online(y, first_iteration=first, config=cfg)
    assert online_decisions == offline_decisions
    offline_result = spike_score(y, first_iteration=first, config=cfg)
    assert online_result == offline_result  # every field, the score bit for bit
    assert offline_result.spikes > 0 and offline_result.evaluated > 0


def test_online_needs_every_iteration_in_order():
    det = OnlineSpikeDetector(100, SpikeConfig(window=10, min_history=5))
    det.update(1, 1.0)
    with pytest.raises(ValueError, match="got iteration 3, expected 2"):
        det.update(3, 1.0)


def test_an_iteration_megatron_did_not_train_is_no_spike_and_a_gap_in_the_window():
    """--iterations-to-skip: iteration 7 was not trained (no value). By hand, window 4, min history 2,
    candidates 0..8 of N = 8: t = 1, 2 have < 2 values (skipped); t = 3..6 see an alternation of 1, 2
    and stay within 7 std; t = 7 is not judged; t = 8 (50) sees 2, 1, 2 and the gap: mean 5/3,
    std sqrt(2/9) = 0.471, |50 - 5/3| >= 7 x 0.471, a spike. Evaluated: 3, 4, 5, 6, 8."""
    cfg = SpikeConfig(window=4, min_history=2, start=0.0, end=1.0)
    y = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, None, 50.0]
    result = spike_score(y, config=cfg, not_trained={7})
    assert (result.spikes, result.evaluated, result.skipped, result.spike_iterations) == (1, 5, 2, [8])
    assert result.window_used == 2 and result.window_max == 4  # t = 3: 2 values; t = 5, 6: a full window
    as_missing = spike_score(y, config=cfg)  # the same gap as a missing value is a spike (a diverged step)
    assert (as_missing.spikes, as_missing.evaluated, as_missing.spike_iterations) == (2, 6, [7, 8])
    det = OnlineSpikeDetector(8, cfg)
    decisions = [det.update(t, v) if t != 7 else det.not_trained(t) for t, v in enumerate(y, start=1)]
    assert decisions == [None, None, False, False, False, False, None, True]
    assert det.result() == result
    with pytest.raises(ValueError, match="got iteration 10, expected 9"):
        det.not_trained(10)


@pytest.mark.parametrize("kwargs,name", [
    (dict(window=0), "window"),
    (dict(window=10, min_history=11), "min_history"),
    (dict(min_history=0), "min_history"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(start=0.6, end=0.5), "start"),
    (dict(end=1.5), "end"),
])
def test_config_is_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"spike score {name}="):
        SpikeConfig(**kwargs)
