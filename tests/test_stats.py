"""eval/stats.py against hand-computed values and simulated data with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from llmforge.errors import UserError
from llmforge.eval.stats import (accuracy_summary, bootstrap_interval, paired_bootstrap, stratified_mean,
                                 wilson_interval)


def test_wilson_matches_hand_computed_values():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674,
    # half-width z sqrt(0.016 + z²/400) / (1 + z²/10) = 0.22658 -> [0.4902, 0.9433]
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    # 0 of 20: [0, z²/(20 + z²)] = [0, 0.16112]; it never leaves [0, 1]
    lo, hi = wilson_interval(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.16112, abs=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.16112, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # the 90% interval is narrower than the 95% one
    assert wilson_interval(50, 100, level=0.9)[0] > wilson_interval(50, 100)[0]
    with pytest.raises(UserError):
        wilson_interval(11, 10)


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p, n = 0.3, 60
    hits = sum(lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in rng.binomial(n, p, 2000)))
    assert 0.92 <= hits / 2000 <= 0.98


def test_bootstrap_interval_of_a_mean_and_of_a_mean_over_strata():
    rng = np.random.default_rng(1)
    values = rng.binomial(1, 0.6, 400)
    lo, hi = bootstrap_interval(values, seed=0)
    se = np.sqrt(0.6 * 0.4 / 400)    # the normal approximation gives about the same width
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < values.mean() < hi
    # strata: the mean of per-task means, not the pooled mean
    v = [1, 1, 1, 1, 0, 0]
    tasks = ["a", "a", "a", "a", "b", "b"]
    assert stratified_mean(v, tasks) == pytest.approx(0.5)
    lo, hi = bootstrap_interval(v, tasks)
    assert lo == hi == pytest.approx(0.5)   # no variance inside either task: every resample is 0.5


def test_paired_bootstrap_detects_a_known_difference():
    """Items of varied difficulty; A answers correctly with probability difficulty + 0.10, B
    with difficulty: a 10-point difference that item difficulty would hide in unpaired
    intervals."""
    rng = np.random.default_rng(2)
    n = 600
    difficulty = rng.uniform(0.1, 0.8, n)
    u = rng.uniform(size=n)      # shared per-item noise: the answers are correlated, as for real models
    a = (u < difficulty + 0.10).astype(float)
    b = (u < difficulty).astype(float)
    out = paired_bootstrap(a, b, seed=0)
    assert out["n"] == n and out["diff"] == pytest.approx(a.mean() - b.mean())
    assert 0 < out["lo"] < 0.10 < out["hi"]
    assert out["p"] < 0.01
    flipped = paired_bootstrap(b, a, seed=0)
    assert flipped["hi"] < 0 and flipped["p"] > 0.99


def test_paired_bootstrap_null_difference_covers_zero():
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(40):
        difficulty = rng.uniform(0.1, 0.9, 200)
        a = (rng.uniform(size=200) < difficulty).astype(float)
        b = (rng.uniform(size=200) < difficulty).astype(float)
        out = paired_bootstrap(a, b, rounds=500, seed=trial)
        covered += out["lo"] <= 0 <= out["hi"]
        assert 0.0 <= out["p"] <= 1.0
    assert covered >= 34    # ~95% of 40; a miscalibrated (too narrow) interval fails this


def test_paired_bootstrap_is_narrower_than_unpaired_on_correlated_items():
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.0, 1.0, 300)
    u = rng.uniform(size=300)
    a, b = (u < difficulty + 0.05).astype(float), (u < difficulty).astype(float)
    paired = paired_bootstrap(a, b)
    lo_a, hi_a = bootstrap_interval(a)
    lo_b, hi_b = bootstrap_interval(b)
    assert paired["hi"] - paired["lo"] < 0.5 * ((hi_a - lo_a) + (hi_b - lo_b)) / 2


def test_paired_bootstrap_with_strata_and_bad_input():
    a = [1, 1, 0, 0, 1, 1]
    b = [0, 1, 0, 0, 1, 0]
    tasks = ["x", "x", "x", "x", "y", "y"]
    out = paired_bootstrap(a, b, tasks, rounds=300)
    assert out["diff"] == pytest.approx((0.25 + 0.5) / 2)   # mean over tasks of per-task differences
    with pytest.raises(UserError, match="same items"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(UserError, match="one label per item"):
        paired_bootstrap([1, 0], [1, 1], ["x"])


def test_accuracy_summary_per_task_and_mean():
    correct = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 7
    tasks = ["a"] * 10 + ["b"] * 10
    s = accuracy_summary(correct, tasks, rounds=500)
    assert s["a"]["accuracy"] == 0.8 and s["a"]["n"] == 10
    assert (s["a"]["lo"], s["a"]["hi"]) == pytest.approx(wilson_interval(8, 10))
    assert s["mean"]["accuracy"] == pytest.approx(0.55)
    assert s["mean"]["lo"] < 0.55 < s["mean"]["hi"]


def test_accuracy_summary_all_wrong_is_not_certain():
    s = accuracy_summary([0] * 30, ["a"] * 15 + ["b"] * 15)
    assert s["mean"]["lo"] == pytest.approx(0.0, abs=1e-12) and s["mean"]["hi"] == pytest.approx(
        wilson_interval(0, 30)[1]) and s["mean"]["hi"] > 0.05
