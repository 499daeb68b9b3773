"""Arena: Bradley–Terry ratings recover known strengths; bootstrap intervals cover them."""
import random

import pytest

from llmforge.eval.arena import (bootstrap_intervals, bradley_terry_ratings, expected_score, judge,
                                 leaderboard)


def simulate(true, n, seed=0, tie_rate=0.0):
    rng = random.Random(seed)
    names = list(true)
    battles = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        if rng.random() < tie_rate:
            battles.append((a, b, "tie"))
            continue
        battles.append((a, b, "a" if rng.random() < expected_score(true[a], true[b]) else "b"))
    return battles


def test_ratings_recover_known_strengths():
    true = {"base": 800.0, "sft": 1000.0, "rl": 1200.0}
    battles = simulate(true, 3000)
    ratings = bradley_terry_ratings(battles)
    assert sum(ratings.values()) / 3 == pytest.approx(1000.0)
    for m in true:
        assert ratings[m] == pytest.approx(true[m], abs=40)
    intervals = bootstrap_intervals(battles, rounds=60, seed=1)
    for m in true:
        lo, hi = intervals[m]
        assert lo <= ratings[m] <= hi
        assert lo - 20 <= true[m] <= hi + 20
    assert intervals["base"][1] < intervals["sft"][0] < intervals["sft"][1] < intervals["rl"][0]


def test_ties_pull_ratings_together_and_order_is_kept():
    true = {"a": 900.0, "b": 1100.0}
    clean = bradley_terry_ratings(simulate(true, 2000, seed=2))
    tied = bradley_terry_ratings(simulate(true, 2000, seed=2, tie_rate=0.5))
    assert clean["b"] > clean["a"] and tied["b"] > tied["a"]
    assert tied["b"] - tied["a"] < clean["b"] - clean["a"]


def test_clean_sweep_stays_finite():
    battles = [("strong", "weak", "a")] * 50
    ratings = bradley_terry_ratings(battles)
    assert ratings["strong"] > ratings["weak"]
    assert abs(ratings["strong"]) < 1e5


def test_leaderboard_rows_and_judge():
    battles = simulate({"x": 900.0, "y": 1100.0}, 400, seed=3)
    rows = leaderboard(battles, rounds=20)
    assert [r["model"] for r in rows] == ["y", "x"]
    assert all(r["lo"] <= r["rating"] <= r["hi"] and r["battles"] == 400 for r in rows)
    assert judge(1.0, 0.0) == "a" and judge(0.0, 1.0) == "b" and judge(1.0, 1.0) == "tie"


def test_bootstrap_resamples_prompts_not_battles():
    """When every prompt's battles move together (here: each of 120 prompts judged 9 times with
    the same outcome, as a deterministic verifier would), the information is in 120 prompts,
    not 1080 battles. Resampling prompts gives the interval of 120 battles; resampling battles
    (no prompt ids) would be ~3x too narrow."""
    once = simulate({"x": 950.0, "y": 1050.0}, 120, seed=5)
    with_ids = [(a, b, w, i) for i, (a, b, w) in enumerate(once) for _ in range(9)]
    without_ids = [(a, b, w) for a, b, w, _ in with_ids]

    def width(battles):
        lo, hi = bootstrap_intervals(battles, rounds=200, seed=0)["y"]
        return hi - lo

    assert bradley_terry_ratings(with_ids) == pytest.approx(bradley_terry_ratings(without_ids))
    assert width(with_ids) == pytest.approx(width(once), rel=0.3)
    assert width(with_ids) > 2.2 * width(without_ids)


def test_leaderboard_takes_battles_with_prompt_ids():
    battles = [(a, b, w, i // 3) for i, (a, b, w) in enumerate(simulate({"p": 900.0, "q": 1100.0}, 300, seed=6))]
    rows = leaderboard(battles, rounds=20)
    assert [r["model"] for r in rows] == ["q", "p"]
    assert all(r["lo"] <= r["rating"] <= r["hi"] and r["battles"] == 300 and r["ties"] == 0 for r in rows)
