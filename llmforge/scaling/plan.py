"""Plan a pretraining run for a budget from the fitted scaling law and this machine's speed.

    llmforge scaling plan --out runs/x --minutes 10      # wall-clock budget on this machine
    llmforge scaling plan --out runs/x --flops 6e13      # compute budget C = 6 N D

Every candidate is a shape of the sweep's own rule (sweep.shape: depth -> width, heads), so the
recommendation is a model the fit has seen the like of. For each candidate:
  --minutes M  D = tokens/s(N) * 60 M, with tokens/s interpolated in log-log between the sizes
               the sweep measured (this is the time-optimal model, not the FLOP-optimal one:
               small matmuls run at a lower FLOP/s on a CPU);
  --flops C    D = C / (6 N).
The plan takes the candidate with the lowest Approach 3 loss L(N, D) = E + A/N^α + B/D^β, and
keeps the sweep's batch, sequence length and lr (the fit was measured with them).
"""
from __future__ import annotations

import numpy as np

from llmforge.config import Config, ModelConfig
from llmforge.errors import UserError
from llmforge.run import RunDir
from llmforge.scaling.config import ScalingConfig
from llmforge.scaling.fit import compute_optimal, load_fit, loss_model

MAX_DEPTH = 48          # candidates: depths 1..MAX_DEPTH of the sweep's shape rule
EXTRAPOLATE = 2.0       # --minutes: sizes up to this factor beyond the measured ones (tokens/s extrapolated)
MIN_STEPS = 100         # fewer optimizer steps than this: halve the batch (a schedule needs steps)


def tokens_per_s(throughput, n) -> np.ndarray:
    """Training tokens/s at N params: linear in log-log between measured sizes; beyond them the
    end segment's slope (or constant FLOP/s, tokens/s ∝ 1/N, with one size measured)."""
    t = np.asarray(sorted(throughput), dtype=float)
    x, y = np.log(t[:, 0]), np.log(t[:, 1])
    q = np.log(np.asarray(n, dtype=float))
    if len(t) == 1:
        return np.exp(y[0] - (q - x[0]))
    out = np.interp(q, x, y)
    lo, hi = q < x[0], q > x[-1]
    out = np.where(lo, y[0] + (q - x[0]) * (y[1] - y[0]) / (x[1] - x[0]), out)
    out = np.where(hi, y[-1] + (q - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2]), out)
    return np.exp(out)


def candidates(rule: dict) -> list[tuple[ModelConfig, int, int]]:
    """(shape, N, N without embeddings) for every depth of the sweep's rule."""
    from llmforge.scaling.sweep import param_counts, shape
    sc = ScalingConfig(aspect=rule["aspect"], head_dim=rule["head_dim"], kv_ratio=rule["kv_ratio"])
    base = ModelConfig(**rule["model"])
    out = []
    for depth in range(1, MAX_DEPTH + 1):
        mc = shape(depth, sc, base)
        counts = param_counts(mc)
        out.append((mc, counts["params"], counts["params_no_embed"]))
    return out


def plan(fit: dict, throughput, minutes: float | None = None, flops: float | None = None) -> dict:
    """The recommended run for a budget of `minutes` on this machine or `flops` (C = 6 N D)."""
    if (minutes is None) == (flops is None):
        raise UserError("give the budget as exactly one of --minutes M or --flops C")
    if (minutes is not None and minutes <= 0) or (flops is not None and flops <= 0):
        raise UserError(f"the budget must be positive, got {minutes if minutes is not None else flops}")
    law = fit.get("approach3", {})
    if not law.get("ok"):
        raise UserError(f"the fit has no Approach 3 law ({law.get('reason', 'an exponent is 0')}); "
                        "sweep more points (budgets x depths) and re-run `llmforge scaling fit`")
    if not throughput:
        raise UserError("no measured tokens/s in the fit; re-run `llmforge scaling sweep` and `scaling fit`")
    rule = fit["rule"]
    measured = [n for n, _ in throughput]
    rows = []
    for mc, n, n_ne in candidates(rule):
        tps = float(tokens_per_s(throughput, n))
        if minutes is not None:
            if not (min(measured) / EXTRAPOLATE <= n <= max(measured) * EXTRAPOLATE):
                continue
            d = tps * 60 * minutes
        else:
            d = flops / (6 * n)
        rows.append({"mc": mc, "params": n, "params_no_embed": n_ne, "tokens": d, "tokens_per_s": tps,
                     "loss": float(loss_model(law, n, d))})
    if not rows:
        raise UserError("no model of the sweep's shape rule is within 2x of the measured sizes; widen scaling.depths")
    rows.sort(key=lambda r: r["loss"])
    best = rows[0]
    mc, n, d = best["mc"], best["params"], best["tokens"]
    B, T, accum = rule["batch_size"], rule["seq_len"], rule.get("grad_accum", 1) or 1
    while B > 1 and d / (B * T * accum) < MIN_STEPS:
        B //= 2
    steps = max(1, round(d / (B * T * accum)))
    c = 6 * n * d
    n_star, d_star = compute_optimal(law, c)
    out = {
        "budget": {"minutes": minutes} if minutes is not None else {"flops": flops},
        "shape": {"n_layer": mc.n_layer, "d_model": mc.d_model, "n_head": mc.n_head, "n_kv_head": mc.n_kv_head,
                  "vocab_size": mc.vocab_size},
        "params": int(n), "params_no_embed": int(best["params_no_embed"]), "tokens": int(d),
        "tokens_per_param": d / n, "flops": c, "tokens_per_s": best["tokens_per_s"],
        "minutes": d / best["tokens_per_s"] / 60,
        "batch_size": B, "seq_len": T, "grad_accum": accum, "steps": steps, "lr": rule["lr"],
        "warmup_steps": min(rule.get("warmup_steps") or 0, max(1, steps // 10)),
        "predicted_loss": best["loss"],
        "predicted_bpb": best["loss"] * fit["bpb_per_nat"] if fit.get("bpb_per_nat") else None,
        "flop_optimal_params": float(n_star), "flop_optimal_tokens": float(d_star),
        "extrapolated": not (min(measured) <= n <= max(measured)),
        "law_at_bound": law.get("at_bound", []),
        "at_edge": best is max(rows, key=lambda r: r["params"]) or best is min(rows, key=lambda r: r["params"]),
        "alternatives": [{"n_layer": r["mc"].n_layer, "d_model": r["mc"].d_model, "params": int(r["params"]),
                          "tokens": int(r["tokens"]), "loss": r["loss"]} for r in rows[:5]],
    }
    out["overrides"] = [f"model.n_layer={mc.n_layer}", f"model.d_model={mc.d_model}", f"model.n_head={mc.n_head}",
                        f"model.n_kv_head={mc.n_kv_head}", f"pretrain.batch_size={B}", f"pretrain.seq_len={T}",
                        f"pretrain.lr={rule['lr']:g}", f"pretrain.warmup_steps={out['warmup_steps']}",
                        f"pretrain.max_steps={steps}"]
    return out


def summary(p: dict) -> str:
    s = p["shape"]
    budget = f"{p['budget']['minutes']:g} minutes" if "minutes" in p["budget"] else f"C = {p['budget']['flops']:.3g} FLOPs"
    lines = [
        f"scaling plan for {budget}:",
        f"  model   {s['n_layer']} layers x {s['d_model']} wide, {s['n_head']} heads ({s['n_kv_head']} kv), vocab "
        f"{s['vocab_size']}: {p['params'] / 1e6:.2f}M params ({p['params_no_embed'] / 1e6:.2f}M without embeddings)",
        f"  data    {p['tokens'] / 1e6:.2f}M tokens ({p['tokens_per_param']:.1f} per param), C = {p['flops']:.3g} FLOPs, "
        f"~{p['minutes']:.1f} min at {p['tokens_per_s']:,.0f} tok/s",
        f"  train   batch {p['batch_size']} x {p['seq_len']}, {p['steps']} steps, lr {p['lr']:g}, "
        f"warmup {p['warmup_steps']}",
        f"  predicted held-out loss {p['predicted_loss']:.4f} nats/token"
        + (f" (~{p['predicted_bpb']:.3f} bpb)" if p.get("predicted_bpb") else ""),
        f"  (FLOP-optimal for the same C: {p['flop_optimal_params'] / 1e6:.2f}M params on "
        f"{p['flop_optimal_tokens'] / 1e6:.2f}M tokens)",
    ]
    if p["extrapolated"]:
        lines.append("  note: this size is outside the sizes the sweep measured; its tokens/s is extrapolated")
    if p.get("law_at_bound"):
        lines.append(f"  note: the fitted law has {', '.join(p['law_at_bound'])} at the edge of its range; "
                     "its predictions are weak (sweep more budgets and sizes)")
    if p["at_edge"]:
        lines.append("  note: the best candidate is the largest or smallest one considered; the optimum may lie beyond")
    lines.append("  run it: llmforge pretrain --out RUN " + " ".join(f"--set {o}" for o in p["overrides"]))
    return "\n".join(lines)


def run(cfg: Config, run: RunDir, minutes: float | None = None, flops: float | None = None) -> dict:
    fit = load_fit(run)
    p = plan(fit, fit.get("throughput"), minutes=minutes, flops=flops)
    print(summary(p))
    return p
