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
