"""Scaling sweep: for every compute budget, train a grid of model sizes through the one loop
and record each point's final held-out loss (the data the Chinchilla fits need).

    llmforge data prepare  --out runs/x --preset cpu
    llmforge scaling sweep --out runs/x [--set scaling.budgets=[3e12,1e13,3e13]] [--set scaling.depths=[1,2,3,4,6]]

The defaults (scaling/config.py) on the cpu preset: depths 1, 2, 3, 4, 6 = 0.32, 0.92, 1.97,
3.87, 10.7M parameters (d_model 64..384, vocab 4096), budgets 3e12, 1e13, 3e13 FLOPs (the
10-minute cpu pretraining is ~5e13): 12 points of >= 50 steps, about 25 minutes on two idle
cores. Run nothing else meanwhile: two trainings on 2 cores slow each 3-5x (flops budgets
keep the losses right, but the measured tokens/s that `scaling plan` uses would be wrong).

A point = (budget, depth). Its shape comes from the depth alone (`shape()`: a fixed aspect
ratio, d_model = aspect * n_layer), its vocabulary from the run's tokenizer, everything else
(batch, seq_len, warmup, schedule, dtype, seed) from [pretrain]; it trains from scratch with
its own full lr schedule, on the run's shards, in RUN/scaling/points/<id>/ (its own
metrics.jsonl and checkpoint, so ckpt/base and the run's metrics are untouched).

Budgets (scaling.unit):
  flops    C = 6 N D per point (N = all parameters, see fit.py): the point trains
           D = C / (6 N) tokens as a step budget. Points on one budget form an exact IsoFLOP
           curve, and the losses do not depend on how busy the machine is.
  minutes  wall-clock minutes per point (the loop stretches the lr schedule to the time);
           FLOPs = 6 N D are recorded from the tokens it reached. Iso-time curves: what a user
           gets per CPU-minute, but other processes on the cores change the numbers.

Every finished point is one line of RUN/scaling/scaling.jsonl: shape, N with and without
embeddings, tokens D, FLOPs, measured tokens/s, wall time, final held-out loss and bpb. A
point already there (with the same settings) is skipped, so an interrupted sweep continues
where it stopped (a point stopped by SIGTERM resumes from its checkpoint; one killed outright
starts over). Plots: RUN/plots/scaling_isoflop.png and scaling_frontier.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llmforge.config import Config, ModelConfig
from llmforge.errors import UserError
from llmforge.eval import bpb
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir, atomic_path
from llmforge.scaling.config import ScalingConfig
from llmforge.stages.pretrain import load_data, model_config
from llmforge.train import distributed
from llmforge.train.loop import Checkpointing, train

STAGE = "scaling"


def scaling_dir(run: RunDir) -> Path:
    return run.root / "scaling"


def records_path(run: RunDir) -> Path:
    return scaling_dir(run) / "scaling.jsonl"


# ------------------------------------------------------------------ the shape rule

def shape(depth: int, sc: ScalingConfig, base: ModelConfig) -> ModelConfig:
    """The model of a given depth: d_model = aspect * depth; heads of ~head_dim (at least one,
    dividing d_model, even head size for RoPE); n_kv_head the largest divisor of n_head that is
    <= n_head / kv_ratio; SwiGLU width 8/3 d_model; vocab, context and the rest from `base`."""
    d = sc.aspect * depth
    n_head = max(1, round(d / sc.head_dim))
    while n_head > 1 and (d % n_head or (d // n_head) % 2):
        n_head -= 1
    limit = max(1, n_head // max(1, sc.kv_ratio))
    n_kv = max(k for k in range(1, limit + 1) if n_head % k == 0)
    return dataclasses.replace(base, n_layer=depth, d_model=d, n_head=n_head, n_kv_head=n_kv, d_ff=0)


def param_counts(mc: ModelConfig) -> dict:
    """N with and without the embedding matrix, counted from the shape (the model's layers
    written out; tests/test_scaling.py checks it against Transformer.num_params)."""
    d, hd, ffn = mc.d_model, mc.head_dim, mc.ffn_dim
    attn = d * mc.n_head * hd * 2 + d * mc.n_kv_head * hd * 2       # q, o; k, v
    if mc.qkv_bias:
        attn += (mc.n_head + 2 * mc.n_kv_head) * hd
    if mc.qk_norm:
        attn += 2 * hd
    layer = attn + 3 * d * ffn + 2 * d                              # SwiGLU gate/up/down, two RMSNorms
    embed = mc.vocab_size * d * (1 if mc.tie_embeddings else 2)     # tied: one matrix is also the head
    total = embed + mc.n_layer * layer + d                          # + the final norm
    total += min(mc.smear_layers, mc.n_layer) * mc.n_kv_head        # smeared keys' gates
    return {"params": total, "params_no_embed": total - embed}


def point_id(unit: str, budget: float, depth: int) -> str:
    b = f"{budget:g}".replace("+", "")
    return f"{'C' if unit == 'flops' else 'min'}{b}_L{depth}"


# ------------------------------------------------------------------ the held-out number

def heldout_loss(model, val_data, token_bytes: torch.Tensor, eot_id: int, batch_size: int, seq_len: int,
                 n_batches: int) -> dict:
    """THE one place the sweep measures held-out loss and bpb: eval/bpb.heldout, called as
    pretraining's eval calls it (context = the model's, the same evenly spaced windows), so a
    point's loss and the pretrain stage's val_loss are the same measurement."""
    out = bpb.heldout(model, val_data, token_bytes, seq_len, max_tokens=n_batches * batch_size * seq_len,
                      eot_id=eot_id, batch_size=batch_size)
    return {"val_loss": out["val_loss"], "val_bpb": out["val_bpb"]}  # its "tokens" would shadow the loop's


# ------------------------------------------------------------------ records

def read_records(run: RunDir) -> list[dict]:
    """The finished points (a torn last line from a killed process is ignored)."""
    path = records_path(run)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(run: RunDir, record: dict) -> None:
    path = records_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one write(): a whole line or none
        f.write(json.dumps(record, sort_keys=True) + "\n")


def measured_tokens_per_s(point_run: RunDir, tokens: int, elapsed: float) -> float:
    """Median of the loop's logged training windows (no eval or checkpoint time in them),
    skipping the first window (warm-up); tokens / wall time when too few were logged."""
    rates = [r["tok_per_s"] for r in point_run.read_metrics(STAGE) if "tok_per_s" in r and r.get("step", 0) > 1]
    return float(statistics.median(rates)) if len(rates) >= 2 else tokens / max(elapsed, 1e-9)


# ------------------------------------------------------------------ the sweep

def validate(sc: ScalingConfig) -> None:
    if sc.unit not in ("flops", "minutes"):
        raise UserError(f"scaling.unit='{sc.unit}' is not flops or minutes; set --set scaling.unit=flops")
    if not isinstance(sc.budgets, list) or not sc.budgets or any(
            not isinstance(b, (int, float)) or isinstance(b, bool) or b <= 0 for b in sc.budgets):
        raise UserError(f"scaling.budgets={sc.budgets} must be a non-empty list of positive numbers, "
                        "e.g. --set scaling.budgets=[1e12,3e12]")
    if not isinstance(sc.depths, list) or not sc.depths or any(
            not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in sc.depths):
        raise UserError(f"scaling.depths={sc.depths} must be a non-empty list of positive integers, "
                        "e.g. --set scaling.depths=[1,2,3]")
    for name in ("aspect", "head_dim", "kv_ratio"):
        if getattr(sc, name) <= 0:
            raise UserError(f"scaling.{name} must be positive, got {getattr(sc, name)}")


def plan_points(cfg: Config, mc_base: ModelConfig) -> list[dict]:
    """Every (budget, depth) of the grid with its shape, N, and (flops unit) its step budget."""
    sc, tc = cfg.scaling, cfg.pretrain
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    points = []
    for budget in sorted(float(b) for b in sc.budgets):
        for depth in sorted(set(sc.depths)):
            mc = shape(depth, sc, mc_base)
            counts = param_counts(mc)
            p = {"id": point_id(sc.unit, budget, depth), "unit": sc.unit, "budget": budget, "depth": depth,
                 "model": dataclasses.asdict(mc), **counts}
            if sc.unit == "flops":
                p["steps"] = max(1, round(budget / (6 * counts["params"]) / tokens_per_step))
                p["skip"] = p["steps"] < sc.min_steps
            else:
                p["steps"], p["skip"] = None, False
            points.append(p)
    return points


def settings(cfg: Config) -> dict:
    """What, beside the point's budget and shape, decides its loss: a recorded point is reused
    only when these are unchanged."""
    tc, sc = cfg.pretrain, cfg.scaling
    return {"batch_size": tc.batch_size, "seq_len": tc.seq_len, "grad_accum": tc.grad_accum,
            "lr": sc.lr or tc.lr, "min_lr_ratio": tc.min_lr_ratio, "warmup_steps": tc.warmup_steps,
            "schedule": tc.schedule, "weight_decay": tc.weight_decay, "dtype": tc.dtype, "seed": tc.seed,
            "eval_batches": sc.eval_batches or tc.eval_batches, "aspect": sc.aspect, "head_dim": sc.head_dim,
            "kv_ratio": sc.kv_ratio}


def same_model(recorded: dict, now: dict) -> bool:
    """A recorded point's model equals this one's; a knob added to ModelConfig since the point
    was trained counts as unchanged while it has its default value."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return all(recorded.get(k, defaults.get(k)) == v for k, v in now.items()) and recorded.keys() <= now.keys()


def point_train_config(cfg: Config, p: dict):
    """A copy of [pretrain] whose budget is this point's alone (so each point has its own full
    lr schedule); no periodic evals, samples or checkpoints (one eval and one save at the end)."""
    tc, sc = cfg.pretrain, cfg.scaling
    if p["unit"] == "flops":
        steps, minutes = p["steps"], 0.0
        warmup = min(tc.warmup_steps, max(1, steps // 10))
    else:
        steps, minutes = 10 ** 9, p["budget"]
        warmup = tc.warmup_steps
    return dataclasses.replace(tc, lr=sc.lr or tc.lr, max_steps=steps, max_tokens=0, minutes=minutes, plan_after=0,
                               warmup_steps=warmup, eval_every=0, sample_every=0, ckpt_every=0,
                               lora_rank=0, log_every=min(tc.log_every, 10))


def run(cfg: Config, run: RunDir, show_progress: bool = True) -> list[dict]:
    sc, tc = cfg.scaling, cfg.pretrain
    validate(sc)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("`llmforge scaling sweep` trains its points in one process; launch it without torchrun")
    tok, train_data, val_data = load_data(run)
    mc_base = model_config(cfg, tok)
    ctx = distributed.setup()
    token_bytes = bpb.token_bytes(tok, mc_base.vocab_size)
    B, T = tc.batch_size, tc.seq_len
    eval_batches = sc.eval_batches or tc.eval_batches
    here = settings(cfg)

    done = {r["id"]: r for r in read_records(run)}
    points = plan_points(cfg, mc_base)
    for p in points:
        old = done.get(p["id"])
        if old is not None and (old.get("settings") != here or not same_model(old.get("model") or {}, p["model"])):
            changed = sorted(k for k in here if old.get("settings", {}).get(k) != here[k]) or ["model shape"]
            raise UserError(f"{records_path(run)} already has point {p['id']} trained with other settings "
                            f"({', '.join(changed)}); use a new --out, or delete {scaling_dir(run)} to start over")
    skipped = [p for p in points if p["skip"]]
    todo = [p for p in points if not p["skip"] and p["id"] not in done]
    for p in skipped:
        print(f"scaling: skip {p['id']} ({p['params'] / 1e6:.2f}M params): its budget buys {p['steps']} steps "
              f"< scaling.min_steps={sc.min_steps}")
    total = sum(p["budget"] for p in todo)
    print(f"scaling: {len(points) - len(skipped)} points ({len(points) - len(skipped) - len(todo)} done, "
          f"{len(todo)} to train) on {train_data.num_tokens:,} train tokens, batch {B} x {T}")

    bar = tqdm(total=total, desc="scaling", unit="FLOP" if sc.unit == "flops" else "min", unit_scale=True,
               dynamic_ncols=True, disable=not (show_progress and todo))
    try:
        for p in todo:
            bar.set_postfix(point=p["id"], N=f"{p['params'] / 1e6:.2f}M")
            record = train_point(cfg, run, p, train_data, val_data, tok, token_bytes, ctx, eval_batches, here)
            append_record(run, record)
            bar.update(p["budget"])
            bar.write(f"scaling: {p['id']}  N={record['params'] / 1e6:.2f}M  D={record['tokens'] / 1e6:.2f}M  "
                      f"loss {record['val_loss']:.4f}  bpb {record['val_bpb']:.4f}  "
                      f"{record['tokens_per_s']:,.0f} tok/s  {record['wall_s']:.0f} s")
    finally:
        bar.close()
    records = read_records(run)
    plots(run, records)
    return records


def train_point(cfg: Config, run: RunDir, p: dict, train_data, val_data, tok, token_bytes, ctx,
                eval_batches: int, here: dict) -> dict:
    tc = point_train_config(cfg, p)
    mc = ModelConfig(**p["model"])
    folder = scaling_dir(run) / "points" / p["id"]
    point_run = RunDir(folder)
    ck = Checkpointing(folder / "ckpt", "base", mc, None, {"scaling_point": p["id"]})
    resume = (ck.dir / "train_state.json").is_file()  # an interrupted point continues; else start clean
    if not resume and folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(tc.seed)
    model = Transformer(mc)
    B, T = tc.batch_size, tc.seq_len

    def get_batch(step, micro, ctx):  # the same data order for every size: common random numbers
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        x, y = train_data.sample_batch(B, T, g)
        return {"input_ids": x, "targets": y}

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"])
        return loss, {}

    def eval_fn(model):
        return heldout_loss(model, val_data, token_bytes, tok.eot_id, B, mc.max_seq_len, eval_batches)

    t0 = time.perf_counter()
    summary = train(model, tc, point_run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ck,
                    eval_fn=eval_fn, resume=resume, show_progress=False)
    wall = time.perf_counter() - t0
    if not cfg.scaling.keep_checkpoints:
        shutil.rmtree(ck.dir, ignore_errors=True)
    tokens = int(summary["tokens"])
    return {
        "id": p["id"], "unit": p["unit"], "budget": p["budget"], "depth": p["depth"],
        "n_layer": mc.n_layer, "d_model": mc.d_model, "n_head": mc.n_head, "n_kv_head": mc.n_kv_head,
        "vocab_size": mc.vocab_size, "model": p["model"],
        "params": p["params"], "params_no_embed": p["params_no_embed"],
        "tokens": tokens, "steps": int(summary["steps"]),
        "flops": 6.0 * p["params"] * tokens,                       # C = 6 N D, the fits' compute
        "flops_exact": model.flops_per_token(T) * tokens,          # + attention scores (PaLM App. B)
        "tokens_per_s": round(measured_tokens_per_s(point_run, tokens, summary["elapsed_s"]), 1),
        "train_s": float(summary["elapsed_s"]), "wall_s": round(wall, 2),
        "val_loss": float(summary["val_loss"]), "val_bpb": float(summary["val_bpb"]),
        "settings": here, "time": round(time.time(), 3),
    }


# ------------------------------------------------------------------ plots

def plots(run: RunDir, records: list[dict], fit: dict | None = None) -> list[str]:
    """IsoFLOP curves (loss vs N per budget, with Approach 2's parabolas when `fit` is given)
    and the loss-vs-compute frontier (with Approach 3's compute-optimal loss)."""
    if not records:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run.plots.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name):
        with atomic_path(run.plots / name) as tmp:
            fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    budgets = sorted({r["budget"] for r in records})
    unit = records[0]["unit"]
    parabolas = {c["budget"]: c for c in (fit or {}).get("approach2", {}).get("curves", [])}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, b in enumerate(budgets):
        pts = sorted((r["params"], r["val_loss"]) for r in records if r["budget"] == b)
        label = f"C={b:.0e}" if unit == "flops" else f"{b:g} min"
        ax.plot([n for n, _ in pts], [l for _, l in pts], "o-" if b not in parabolas else "o", color=f"C{i % 10}",
                label=label, lw=1)
        c = parabolas.get(b)
        if c and c.get("coef"):
            x = np.linspace(math.log(pts[0][0]), math.log(pts[-1][0]), 50)
            ax.plot(np.exp(x), np.polyval(c["coef"], x), "-", color=f"C{i % 10}", lw=1)
            if c.get("ok"):
                ax.plot([c["n_opt"]], [c["loss_opt"]], "*", color=f"C{i % 10}", ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (with embeddings)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("IsoFLOP curves" if unit == "flops" else "iso-time curves", fontsize=10)
    ax.legend(fontsize=7)
    save(fig, "scaling_isoflop.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter([r["flops"] for r in records], [r["val_loss"] for r in records], s=14, c="C0", label="points")
    best = [min((r for r in records if r["budget"] == b), key=lambda r: r["val_loss"]) for b in budgets]
    best.sort(key=lambda r: r["flops"])
    ax.plot([r["flops"] for r in best], [r["val_loss"] for r in best], "-", color="C1", lw=1,
            label="best per budget")
    a3 = (fit or {}).get("approach3")
    if a3 and a3.get("ok"):
        from llmforge.scaling.fit import compute_optimal, loss_model
        c = np.geomspace(min(r["flops"] for r in records) / 2, max(r["flops"] for r in records) * 4, 50)
        n_opt, d_opt = compute_optimal(a3, c)
        ax.plot(c, loss_model(a3, n_opt, d_opt), "--", color="C2", lw=1, label="Approach 3 optimum")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("loss vs compute", fontsize=10)
    ax.legend(fontsize=7)
    save(fig, "scaling_frontier.png")
    return made
