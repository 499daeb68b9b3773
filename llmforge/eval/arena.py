"""Arena: pairwise battles between checkpoints, rated like Chatbot Arena.

Ratings are the maximum-likelihood Bradley–Terry strengths on the Elo scale
(P(a beats b) = 1 / (1 + 10^((R_b - R_a)/400)), Zheng et al. 2023 / Chiang et al. 2024),
fitted on all battles at once (not the order-dependent online Elo update), with a tie
counted as half a win for each side.

A battle is (model_a, model_b, winner) or (model_a, model_b, winner, prompt_id). Every pair of
models battles on the same prompts, so battles of one prompt are not independent (an easy
prompt is a tie for everyone). 95% intervals therefore come from bootstrap resampling of
PROMPTS: a resample draws prompt ids with replacement and takes all battles of each drawn
prompt together. Battles without a prompt id count as their own prompt.
"""
from __future__ import annotations

import math
import random

import numpy as np

SCALE, BASE, INIT = 400.0, 10.0, 1000.0


def bradley_terry_ratings(battles: list[tuple[str, str, str]], models: list[str] | None = None,
                          l2: float = 1e-3, iters: int = 100) -> dict[str, float]:
    """battles: (model_a, model_b, winner) with winner in {"a", "b", "tie"} -> Elo-scale ratings
    (mean INIT). A tiny L2 prior keeps ratings finite when one model wins every battle."""
    models = models or sorted({m for battle in battles for m in battle[:2]})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[battle[0]] for battle in battles], dtype=int)
    b = np.array([index[battle[1]] for battle in battles], dtype=int)
    y = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[battle[2]] for battle in battles])
    theta = np.zeros(len(models))
    # Newton's method on the penalized log-likelihood Σ y log σ(θa-θb) + (1-y) log σ(θb-θa) - l2/2 |θ|²
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
        grad = -l2 * theta
        np.add.at(grad, a, y - p)
        np.add.at(grad, b, p - y)
        w = p * (1 - p)
        hess = -l2 * np.eye(len(models))
        np.add.at(hess, (a, a), -w)
        np.add.at(hess, (b, b), -w)
        np.add.at(hess, (a, b), w)
        np.add.at(hess, (b, a), w)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    theta -= theta.mean()
    return {m: INIT + SCALE * theta[i] / math.log(BASE) for m, i in index.items()}


def by_prompt(battles) -> list[list]:
    """Battles grouped by prompt id (4th field), in first-seen order; a battle without one is
    its own group."""
    groups: dict = {}
    for i, battle in enumerate(battles):
        key = ("prompt", battle[3]) if len(battle) > 3 else ("battle", i)
        groups.setdefault(key, []).append(battle)
    return list(groups.values())


def bootstrap_intervals(battles, rounds: int = 200, seed: int = 0, models=None) -> dict[str, tuple[float, float]]:
    """95% interval of each rating: `rounds` resamples of the prompts (with replacement), each
    bringing all of its battles, refitted; the 2.5th and 97.5th percentiles."""
    models = models or sorted({m for battle in battles for m in battle[:2]})
    groups = by_prompt(battles)
    rng = random.Random(seed)
    samples = {m: [] for m in models}
    for _ in range(rounds):
        picks = [groups[rng.randrange(len(groups))] for _ in groups]
        resample = [battle for group in picks for battle in group]
        for m, r in bradley_terry_ratings(resample, models).items():
            samples[m].append(r)
    return {m: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for m, v in samples.items()}


def leaderboard(battles, rounds: int = 200, seed: int = 0) -> list[dict]:
    """Rows {model, rating, lo, hi, battles, wins, ties} sorted best first; lo/hi from the
    bootstrap over prompts."""
    ratings = bradley_terry_ratings(battles)
    intervals = bootstrap_intervals(battles, rounds, seed, list(ratings))
    rows = []
    for m, r in ratings.items():
        n = sum(m in battle[:2] for battle in battles)
        wins = sum((b[0] == m and b[2] == "a") or (b[1] == m and b[2] == "b") for b in battles)
        ties = sum(m in b[:2] and b[2] == "tie" for b in battles)
        rows.append({"model": m, "rating": float(r), "lo": intervals[m][0], "hi": intervals[m][1],
                     "battles": n, "wins": wins, "ties": ties})
    return sorted(rows, key=lambda row: -row["rating"])


def expected_score(r_a: float, r_b: float) -> float:
    """P(a beats b) under the Elo-scale Bradley–Terry model."""
    return 1.0 / (1.0 + BASE ** ((r_b - r_a) / SCALE))


def judge(reward_a: float, reward_b: float) -> str:
    """A verifier-judged battle: the higher verified reward wins; equal rewards tie."""
    if reward_a > reward_b:
        return "a"
    if reward_b > reward_a:
        return "b"
    return "tie"
