"""Fit scaling laws to a sweep: Chinchilla's Approaches 2 and 3 (Hoffmann et al. 2022).

    llmforge scaling fit --out runs/x [--set scaling.bootstrap=200]

Reads RUN/scaling/scaling.jsonl, writes RUN/scaling/fit.json, redraws the scaling plots with
the fits, and prints a summary.

Approach 2 (IsoFLOP profiles): on each budget's curve fit a parabola to loss against ln N;
its vertex is N_opt(C). Then N_opt = k C^a and D_opt = C / (6 N_opt) ∝ C^b by least squares
in log-log over the curves whose vertex lies inside the sizes trained (bracketed).
Approach 3 (parametric loss): L(N, D) = E + A / N^α + B / D^β, fitted by minimising the Huber
loss (δ = 1e-3) between log L̂ and log L with L-BFGS (scipy, analytic gradient) started from
the best points of a grid of initialisations (Hoffmann et al. App. D.2). It gives
N_opt = G (C/6)^a, D_opt = (C/6)^b / G with a = β / (α + β), b = α / (α + β),
G = (α A / (β B))^(1 / (α + β)).
Intervals: 95% percentile bootstrap, resampling points (within each curve for Approach 2).

Which N: all parameters, embeddings included (as Hoffmann et al.). At this scale the
embedding matrix is a third to two thirds of the model, and leaving it out (as Kaplan et
al. 2020 did) bends small-model exponents (Pearce & Song 2024, "Reconciling Kaplan and
Chinchilla"). With tied embeddings the one vocab x d matrix is also the output layer's
matmul, so C = 6 N D with this N is the training FLOPs up to attention scores.
Approach 3 is also fitted with the non-embedding count, reported for comparison only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.run import RunDir, write_json_atomic

PARAMS_USED = "params"
PARAMS_WHY = ("N counts all parameters, embeddings included (Hoffmann et al.): at this scale the embedding is "
              "1/3-2/3 of the model and non-embedding counts bend small-model exponents (Pearce & Song 2024); "
              "with tied embeddings it is also the output matmul, so 6ND is the training FLOPs minus attention")


# ------------------------------------------------------------------ Approach 3: L(N, D) = E + A/N^α + B/D^β

def loss_model(p: dict, n, d):
    """The parametric loss of Hoffmann et al. (eq. 2) at N params and D tokens."""
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def compute_optimal(p: dict, c):
    """N_opt(C), D_opt(C) of the parametric loss under C = 6 N D (Hoffmann et al. eq. 4)."""
    c = np.asarray(c, dtype=float)
    n_opt = p["G"] * (c / 6) ** p["a"]
    return n_opt, c / (6 * n_opt)


INIT_GRID = {"alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
             "e": [-1.0, -0.5, 0.0, 0.5, 1.0], "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
             "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]}   # Hoffmann et al. App. D.2


# (a, b, e, α, β): wide enough for any sensible law, finite so degenerate data cannot overflow exp()
BOUNDS = [(-20.0, 100.0), (-20.0, 100.0), (-10.0, 10.0), (0.0, 10.0), (0.0, 10.0)]


def _grid() -> np.ndarray:
    g = INIT_GRID
    mesh = np.meshgrid(*(g[k] for k in ("a", "b", "e", "alpha", "beta")), indexing="ij")
    return np.stack([m.ravel() for m in mesh], 1)


def _objective(theta, log_n, log_d, log_l, w, delta: float):
    """sum_i w_i Huber_δ(log L̂_i - log L_i) with log L̂ = LSE(a - α log N, b - β log D, e), and
    its gradient in theta = (a, b, e, α, β). theta may be a (G, 5) grid: then objectives only."""
    theta = np.asarray(theta, dtype=float)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    u = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))   # (3, ..., n)
    top = u.max(0)
    s = np.exp(u - top)
    log_pred = top + np.log(s.sum(0))
    r = log_pred - log_l
    huber = np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
    obj = (w * huber).sum(-1)
    if theta.ndim > 1:
        return obj
    soft = s / s.sum(0)                                # d log L̂ / d u_j
    g = w * np.clip(r, -delta, delta)                   # d Huber / d r, weighted
    grad = np.array([(g * soft[0]).sum(), (g * soft[1]).sum(), (g * soft[2]).sum(),
                     -(g * soft[0] * log_n).sum(), -(g * soft[1] * log_d).sum()])
    return float(obj), grad


def _approach3_theta(n, d, loss, delta: float, weights=None, starts: int = 8, extra=None):
    """Best (a, b, e, α, β) from L-BFGS started at the `starts` best points of the grid (and at
    `extra`). `weights` (a bootstrap resample's counts per point) default to ones."""
    from scipy.optimize import minimize
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    w = np.ones(len(log_n)) if weights is None else np.asarray(weights, dtype=float)
    inits = [np.asarray(extra)] if extra is not None else []
    if starts:
        grid = _grid()
        inits += list(grid[np.argsort(_objective(grid, log_n, log_d, log_l, w, delta))[:starts]])
    best, best_obj = None, math.inf
    for theta0 in inits:
        res = minimize(_objective, theta0, args=(log_n, log_d, log_l, w, delta), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if np.isfinite(res.fun) and res.fun < best_obj and np.isfinite(res.x).all():
            best, best_obj = res.x, float(res.fun)
    return best, best_obj


def _params_of(theta, objective: float) -> dict:
    a_, b_, e_, alpha, beta = (float(v) for v in theta)
    p = {"E": math.exp(e_), "A": math.exp(a_), "B": math.exp(b_), "alpha": alpha, "beta": beta,
         "huber_objective": objective,
         "at_bound": [name for name, v, (lo, hi) in zip(("a", "b", "e", "alpha", "beta"), theta, BOUNDS)
                      if min(v - lo, hi - v) < 1e-6]}
    if alpha > 0 and beta > 0:
        p["a"], p["b"] = beta / (alpha + beta), alpha / (alpha + beta)
        p["G"] = math.exp((math.log(alpha) + a_ - math.log(beta) - b_) / (alpha + beta))
        p["ok"] = True
    else:  # a flat direction: no compute-optimal trade-off can be read off
        p["a"] = p["b"] = p["G"] = None
        p["ok"] = False
    return p


def approach3(n, d, loss, delta: float = 1e-3, bootstrap: int = 0, seed: int = 0) -> dict:
    """Fit L(N, D) = E + A/N^α + B/D^β; with bootstrap > 0, 95% intervals on α, β, a, b, E."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    if len(n) < 5:
        return {"ok": False, "reason": f"{len(n)} points; Approach 3 has 5 parameters and needs at least 5"}
    theta, obj = _approach3_theta(n, d, loss, delta)
    if theta is None:
        return {"ok": False, "reason": "L-BFGS did not converge from any initialisation"}
    out = _params_of(theta, obj)
    pred = loss_model(out, n, d)
    out["rms_rel_error"] = float(np.sqrt(np.mean((pred / loss - 1) ** 2)))
    out["n_points"] = int(len(n))
    if bootstrap > 0:  # resample points; each refit starts from the full-data optimum
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            counts = np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n))
            if (counts > 0).sum() < 5:  # 5 parameters need 5 distinct points
                continue
            th, ob = _approach3_theta(n, d, loss, delta, weights=counts, starts=0, extra=theta)
            if th is not None:
                draws.append(_params_of(th, ob))
        out["bootstrap"] = len(draws)
        out["ci"] = {k: _interval([p[k] for p in draws if p.get(k) is not None])
                     for k in ("alpha", "beta", "a", "b", "E")}
    return out


def _interval(values) -> list[float] | None:
    if len(values) < 10:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# ------------------------------------------------------------------ Approach 2: IsoFLOP parabolas

def parabola(n, loss, c) -> dict:
    """Vertex of loss = p0 x^2 + p1 x + p2 in x = ln N on one IsoFLOP curve; C at the vertex is
    read off ln C vs ln N (constant on an exact IsoFLOP curve; varies on an iso-time one)."""
    x, y, lc = np.log(n), np.asarray(loss, float), np.log(c)
    out = {"sizes": int(len(np.unique(x)))}
    if out["sizes"] < 3:
        return {**out, "ok": False, "reason": "fewer than 3 sizes"}
    coef = np.polyfit(x, y, 2)
    out["coef"] = [float(v) for v in coef]
    if coef[0] <= 0:
        return {**out, "ok": False, "reason": "not convex: no minimum inside; widen scaling.depths"}
    x_opt = -coef[1] / (2 * coef[0])
    out.update(n_opt=float(math.exp(x_opt)), loss_opt=float(np.polyval(coef, x_opt)),
               c=float(math.exp(np.polyval(np.polyfit(x, lc, 1), x_opt) if np.ptp(lc) > 0 else lc[0])))
    if not (x.min() <= x_opt <= x.max()):
        side = "smaller" if x_opt < x.min() else "larger"
        return {**out, "ok": False, "reason": f"vertex outside the sizes trained; add {side} depths"}
    out["d_opt"] = out["c"] / (6 * out["n_opt"])
    return {**out, "ok": True}


def _power_law(c, y) -> tuple[float, float]:
    """y = k C^e by least squares in log-log: (e, k)."""
    e, log_k = np.polyfit(np.log(c), np.log(y), 1)
    return float(e), float(math.exp(log_k))


def _curves(records) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in records:
        out.setdefault(r["budget"], []).append(r)
    return {b: sorted(rs, key=lambda r: r[PARAMS_USED]) for b, rs in sorted(out.items())}


def _approach2_from(curves: dict[float, list[dict]]) -> dict:
    fits = []
    for budget, rs in curves.items():
        p = parabola([r[PARAMS_USED] for r in rs], [r["val_loss"] for r in rs], [r["flops"] for r in rs])
        fits.append({"budget": budget, **p})
    good = [f for f in fits if f["ok"]]
    out = {"curves": fits, "ok": len(good) >= 2}
    if not out["ok"]:
        out["reason"] = f"{len(good)} bracketed IsoFLOP curve(s); need at least 2 (more budgets, wider depths)"
        return out
    c = [f["c"] for f in good]
    out["a"], out["k_n"] = _power_law(c, [f["n_opt"] for f in good])
    out["b"], out["k_d"] = _power_law(c, [f["d_opt"] for f in good])
    return out


def narrow(curves: dict[float, list[dict]]) -> dict[float, list[dict]]:
    """The same curves on a narrower grid: every curve of 4 or more sizes loses its outermost
    size on the side farther (in ln N) from its vertex; curves of 3 stay as they are."""
    out = {}
    for b, rs in curves.items():
        if len(rs) >= 4:
            p = parabola([r[PARAMS_USED] for r in rs], [r["val_loss"] for r in rs], [r["flops"] for r in rs])
            x = [math.log(r[PARAMS_USED]) for r in rs]
            x_opt = math.log(p["n_opt"]) if "n_opt" in p else float(np.mean(x))
            rs = rs[1:] if x_opt - x[0] > x[-1] - x_opt else rs[:-1]
        out[b] = rs
    return out


def approach2(records, bootstrap: int = 0, seed: int = 0) -> dict:
    curves = _curves(records)
    out = _approach2_from(curves)
    if out["ok"] and bootstrap > 0:
        rng = np.random.default_rng(seed)
        a_s, b_s = [], []
        for _ in range(bootstrap):
            sample = {b: [rs[i] for i in rng.integers(0, len(rs), len(rs))] for b, rs in curves.items()}
            f = _approach2_from(sample)
            if f["ok"]:
                a_s.append(f["a"])
                b_s.append(f["b"])
        out["bootstrap"] = len(a_s)
        out["ci"] = {"a": _interval(a_s), "b": _interval(b_s)}
    # grid width: the parabola is a local, symmetric model of an asymmetric curve (steeper on the
    # small-N side), so its vertex moves with how far the grid reaches on each side
    n_full = _approach2_from(curves)
    n_narrow = _approach2_from(narrow(curves))
    out["grid_width"] = {
        "a_full": n_full.get("a"), "a_narrow": n_narrow.get("a"),
        "delta_a": (n_narrow["a"] - n_full["a"]) if n_full["ok"] and n_narrow["ok"] else None,
        "n_opt_ratio": [nf["n_opt"] / nn["n_opt"] if nf.get("ok") and nn.get("ok") else None
                        for nf, nn in zip(n_full["curves"], n_narrow["curves"])],
        "note": "Approach 2 refitted with each curve's outermost size on the side farther from its vertex "
                "dropped (curves of >= 4 sizes). A parabola in ln N only approximates the loss near its minimum; the "
                "curve is steeper toward small N, so a wide grid pulls the vertex toward larger N and the "
                "exponent moves with the grid. Trust a only when delta_a is well inside its interval.",
    }
    return out


# ------------------------------------------------------------------ the command

def throughput_table(records) -> list[list[float]]:
    """[N, tokens/s] per size (median over that size's points), sorted by N."""
    by_n: dict[int, list[float]] = {}
    for r in records:
        by_n.setdefault(r["params"], []).append(r["tokens_per_s"])
    return [[float(n), float(np.median(v))] for n, v in sorted(by_n.items())]


def fit_records(records: list[dict], bootstrap: int = 200, huber_delta: float = 1e-3, seed: int = 0) -> dict:
    if not records:
        raise UserError("no finished points to fit; run `llmforge scaling sweep --out RUN` first")
    n = [r[PARAMS_USED] for r in records]
    d = [r["tokens"] for r in records]
    loss = [r["val_loss"] for r in records]
    first = records[0]
    s = first.get("settings", {})
    out = {
        "params_used": PARAMS_USED, "params_why": PARAMS_WHY,
        "unit": first["unit"], "budgets": sorted({r["budget"] for r in records}), "n_points": len(records),
        "approach2": approach2(records, bootstrap, seed),
        "approach3": approach3(n, d, loss, huber_delta, bootstrap, seed),
        "approach3_no_embed": approach3([r["params_no_embed"] for r in records], d, loss, huber_delta),
        "throughput": throughput_table(records),
        "bpb_per_nat": float(np.mean([r["val_bpb"] / r["val_loss"] for r in records])),
        "rule": {"model": first["model"], "aspect": s.get("aspect"), "head_dim": s.get("head_dim"),
                 "kv_ratio": s.get("kv_ratio"), "batch_size": s.get("batch_size"), "seq_len": s.get("seq_len"),
                 "grad_accum": s.get("grad_accum", 1), "lr": s.get("lr"), "warmup_steps": s.get("warmup_steps")},
    }
    return out


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"


def summary(fit: dict) -> str:
    lines = [f"scaling fit: {fit['n_points']} points, budgets {', '.join(f'{b:g}' for b in fit['budgets'])} "
             f"({fit['unit']})", f"N: {fit['params_why']}"]
    a2 = fit["approach2"]
    lines.append("Approach 2 (IsoFLOP parabolas):")
    for c in a2["curves"]:
        if c["ok"]:
            lines.append(f"  budget {c['budget']:g}: N_opt {c['n_opt'] / 1e6:.3f}M  D_opt {c['d_opt'] / 1e6:.2f}M  "
                         f"loss {c['loss_opt']:.4f}  ({c['sizes']} sizes)")
        else:
            lines.append(f"  budget {c['budget']:g}: {c['reason']}")
    if a2["ok"]:
        ci = a2.get("ci", {})
        lines.append(f"  N_opt ∝ C^{a2['a']:.3f} {_fmt_ci(ci.get('a'))}   D_opt ∝ C^{a2['b']:.3f} {_fmt_ci(ci.get('b'))}")
        g = a2["grid_width"]
        if g["delta_a"] is not None:
            lines.append(f"  grid width: each curve's farthest size dropped -> a = {g['a_narrow']:.3f} "
                         f"(change {g['delta_a']:+.3f}; a parabola only fits near the minimum)")
        else:
            lines.append("  grid width: the narrowed grid brackets fewer than 2 curves; no comparison")
    else:
        lines.append(f"  not fitted: {a2['reason']}")
    a3 = fit["approach3"]
    lines.append("Approach 3 (L = E + A/N^α + B/D^β, Huber on log-loss):")
    if a3.get("ok"):
        ci = a3.get("ci", {})
        lines.append(f"  E={a3['E']:.3f} {_fmt_ci(ci.get('E'))}  A={a3['A']:.4g}  B={a3['B']:.4g}  "
                     f"α={a3['alpha']:.3f} {_fmt_ci(ci.get('alpha'))}  β={a3['beta']:.3f} {_fmt_ci(ci.get('beta'))}")
        lines.append(f"  N_opt ∝ C^{a3['a']:.3f} {_fmt_ci(ci.get('a'))}   D_opt ∝ C^{a3['b']:.3f} {_fmt_ci(ci.get('b'))}"
                     f"   rms error {a3['rms_rel_error']:.2%}")
        if a3.get("at_bound"):
            lines.append(f"  warning: {', '.join(a3['at_bound'])} at the edge of its range: the points do not "
                         "pin this law down (more budgets and sizes)")
        nb = fit["approach3_no_embed"]
        if nb.get("ok"):
            lines.append(f"  (with non-embedding N instead: α={nb['alpha']:.3f} β={nb['beta']:.3f} a={nb['a']:.3f}; "
                         "not used)")
        for c in fit["budgets"] if fit["unit"] == "flops" else []:
            n_opt, d_opt = compute_optimal(a3, c)
            lines.append(f"  C={c:g}: N_opt {float(n_opt) / 1e6:.3f}M, D_opt {float(d_opt) / 1e6:.2f}M "
                         f"({float(d_opt / n_opt):.1f} tokens/param), loss {float(loss_model(a3, n_opt, d_opt)):.4f}")
    else:
        lines.append(f"  not fitted: {a3.get('reason', 'an exponent is 0 (a flat direction)')}")
    return "\n".join(lines)


def fit_path(run: RunDir) -> Path:
    return run.root / "scaling" / "fit.json"


def load_fit(run: RunDir) -> dict:
    path = fit_path(run)
    if not path.is_file():
        raise UserError(f"{path} is missing; run `llmforge scaling fit --out {run.root}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; re-run `llmforge scaling fit --out {run.root}`") from None


def run(cfg: Config, run: RunDir) -> dict:
    from llmforge.scaling.sweep import plots, read_records, records_path
    records = read_records(run)
    if not records:
        raise UserError(f"{records_path(run)} has no finished points; run `llmforge scaling sweep --out {run.root}` first")
    if len({r["unit"] for r in records}) > 1:
        raise UserError(f"{records_path(run)} mixes flops and minutes budgets; fit one unit per run directory")
    sc = cfg.scaling
    fit = fit_records(records, sc.bootstrap, sc.huber_delta, sc.seed)
    write_json_atomic(fit_path(run), fit)
    plots(run, records, fit)
    print(summary(fit))
    print(f"wrote {fit_path(run)} and {run.plots}/scaling_*.png")
    return fit
