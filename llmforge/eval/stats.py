"""Statistics for evaluation: how sure is a number, and is A really better than B?

Pure functions on plain lists (no models, no files), so they are easy to test and to reuse:

- wilson_interval: the 95% interval of an accuracy k/n (Wilson 1927): unlike the normal
  approximation it stays inside [0, 1] and is sensible at 0/n and n/n;
- bootstrap_interval: percentile bootstrap interval of a mean (Efron & Tibshirani 1993), or
  of a mean over strata (e.g. the mean over tasks of per-task accuracy: items are resampled
  within their task, so every resample keeps each task's item count);
- paired_bootstrap: model A vs model B on the SAME items. The unit resampled is the prompt
  (item), and A's and B's scores on it move together, so the large item-to-item variance
  (easy vs hard prompts) cancels out of the difference. Returns the difference, its interval
  and the share of resamples in which A does not beat B (a one-sided bootstrap p-value,
  Efron & Tibshirani 1993 ch. 16; Koehn 2004 for the same test in MT evaluation).

20 items per task give about +-20 points per task; use >= 100 (see DESIGN.md).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

from llmforge.errors import UserError

ROUNDS = 2000


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be between 0 and 1, got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n; (0, 1) when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise UserError(f"an accuracy needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _strata(n: int, strata: Sequence | None) -> list[np.ndarray]:
    """Indices of each stratum (one stratum of everything when strata is None)."""
    if strata is None:
        return [np.arange(n)]
    if len(strata) != n:
        raise UserError(f"strata has {len(strata)} labels for {n} items; give one label per item")
    labels = {}
    for i, s in enumerate(strata):
        labels.setdefault(s, []).append(i)
    return [np.asarray(v) for v in labels.values()]


def _resampled_means(values: np.ndarray, groups: list[np.ndarray], rounds: int,
                     rng: np.random.Generator) -> np.ndarray:
    """`rounds` bootstrap replicates of the mean over strata of each stratum's mean."""
    out = np.zeros(rounds)
    for idx in groups:
        picks = idx[rng.integers(0, len(idx), size=(rounds, len(idx)))]
        out += values[picks].mean(axis=1)
    return out / len(groups)


def stratified_mean(values: Sequence[float], strata: Sequence | None = None) -> float:
    """Mean over strata of each stratum's mean (the plain mean when strata is None)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise UserError("no items to average; evaluate at least one item")
    return float(np.mean([v[idx].mean() for idx in _strata(len(v), strata)]))


def bootstrap_interval(values: Sequence[float], strata: Sequence | None = None, rounds: int = ROUNDS,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of stratified_mean(values, strata)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise UserError("no items to bootstrap; evaluate at least one item")
    _z(level)
    reps = _resampled_means(v, _strata(len(v), strata), rounds, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    return float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], strata: Sequence | None = None,
                     rounds: int = ROUNDS, seed: int = 0, level: float = 0.95) -> dict:
    """A vs B on the same items (a[i], b[i] are their scores on item i): resample items with
    replacement (within strata, when given), A's and B's scores together.

    Returns {"diff": mean(A) - mean(B) (over strata when given), "lo", "hi": its percentile
    interval, "p": share of resamples with diff <= 0 (small = A reliably better than B;
    near 1 = B reliably better), "n": items}."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.shape != b_.shape:
        raise UserError(f"paired comparison needs both models scored on the same items; got {a_.size} "
                        f"and {b_.size} scores")
    if a_.size == 0:
        raise UserError("no items to compare; evaluate at least one item")
    _z(level)
    d = a_ - b_
    groups = _strata(len(d), strata)
    reps = _resampled_means(d, groups, rounds, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    return {"diff": stratified_mean(d, strata), "lo": float(np.quantile(reps, alpha)),
            "hi": float(np.quantile(reps, 1 - alpha)), "p": float(np.mean(reps <= 0)), "n": int(d.size)}


def accuracy_summary(correct: Sequence[float], tasks: Sequence[str], rounds: int = ROUNDS,
                     seed: int = 0) -> dict:
    """Per task: accuracy with its Wilson interval; "mean" (mean over tasks): stratified
    bootstrap interval (Wilson on the pooled count when every item scored the same, where the
    bootstrap degenerates). -> {task: {"accuracy", "lo", "hi", "n"}, "mean": {...}}."""
    c = np.asarray(correct, dtype=float)
    if c.size == 0:
        raise UserError("no items to summarise; evaluate at least one item")
    out = {}
    for idx in _strata(len(c), tasks):
        k, n = int(c[idx].sum()), len(idx)
        lo, hi = wilson_interval(k, n)
        out[tasks[idx[0]]] = {"accuracy": k / n, "lo": lo, "hi": hi, "n": n}
    if c.min() == c.max():
        # every item right (or every item wrong): each resample is the same, and the percentile
        # bootstrap would claim certainty; use Wilson on the pooled count instead
        lo, hi = wilson_interval(int(c.sum()), int(c.size))
    else:
        lo, hi = bootstrap_interval(c, tasks, rounds=rounds, seed=seed)
    out["mean"] = {"accuracy": stratified_mean(c, tasks), "lo": lo, "hi": hi, "n": int(c.size)}
    return out
