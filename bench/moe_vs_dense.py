"""Dense vs mixture of experts at equal active parameters, for equal minutes and for equal FLOPs.

    python bench/moe_vs_dense.py runs/cpu --minutes 2
    python bench/moe_vs_dense.py --profile      # where a training step's time goes, dense vs MoE

Arms, one after another in this process (never two at once), each pretrained from scratch on
RUN's shards with the `cpu` recipe (Muon, no midtraining, no evaluation while training):

    dense       the `cpu` model: 4 x 192, SwiGLU width 512, for M minutes. Its FLOPs
                (flops_per_token x tokens) are the budget of the *-flops arms
    tc          `cpu-moe`: 8 experts of width 256, top-2 token choice, load-balance and z losses
    ec          8 experts of width 256, expert choice at capacity factor 1 (2 experts per token
                on average, as tc), z loss only
    tc-noaux    tc without the load-balance loss: what the router does left alone
    tc-flops, ec-flops   tc and ec trained for the dense arm's FLOPs (their own max_tokens)

All have the same active parameters per token (2.41M, plus 6k router weights); FLOPs per token
count the router's matmul and the gating/combining of the experts' outputs
(Transformer.flops_per_token). Each arm is scored by eval/bpb.heldout on the whole validation
split; ec arms also with the training rule (experts choosing over the batch) to give the gap
the decoding rule costs. Printed: held-out bpb, tokens, tokens/s, MFU by active parameters,
load balance (max expert load / mean, averaged over the logged steps after warm-up, worst
layer), and MoE / dense ratios. OUT/expert_load.png plots every expert's load over the steps
for tc, tc-noaux and ec; OUT/results.json keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmforge.config import resolve
from llmforge.eval import bpb
from llmforge.eval.report import draw_expert_load, expert_load_keys
from llmforge.model.moe import batch_routing_at_eval, moe_layers, router_losses
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.stages import pretrain
from llmforge.train.checkpoint import load_model, load_run_tokenizer
from llmforge.train.loop import measured_peak_flops
from llmforge.train.optim import build_optimizer, orthogonalize

# no minutes unless an arm sets them, and those are exact (no plan_after: the schedule stretches to the time)
COMMON = ["pretrain.max_steps=1000000", "pretrain.minutes=0", "pretrain.plan_after=0", "pretrain.mid_fraction=0", "pretrain.eval_every=0",
          "pretrain.sample_every=0", "pretrain.ckpt_every=0", "pretrain.eval_tasks_per_task=0", "pretrain.log_every=5"]
MOE = ["model.moe_experts=8", "model.moe_top_k=2"]
EC = [*MOE, "model.moe_router=expert_choice", "model.moe_capacity_factor=1.0"]
ARMS = {  # name: (overrides, budget): "minutes" = M minutes, "flops" = the dense arm's FLOPs
    "dense": ([], "minutes"),
    "tc": (MOE, "minutes"),
    "ec": (EC, "minutes"),
    "tc-noaux": ([*MOE, "model.moe_aux_coef=0"], "minutes"),
    "tc-flops": (MOE, "flops"),
    "ec-flops": (EC, "flops"),
}


def heldout_bpb(model, run: RunDir) -> float:
    """The eval stage's bits/byte: the whole validation split at the model's context."""
    return bpb.heldout_of_run(model, run, load_run_tokenizer(run))["val_bpb"]


def balance(records: list[dict], warmup: int) -> float | None:
    """Max expert load over the mean (1 = balanced, E = one expert takes everything), averaged
    over the logged steps after `warmup`, for the worst layer."""
    keys = expert_load_keys(records)
    late = [r for r in records if r["step"] > warmup]
    if not keys or not late:
        return None
    return max(sum(max(r[k]) * len(r[k]) for r in late) / len(late) for k in keys)


def run_arm(source: RunDir, name: str, minutes: float, flops_budget: float | None, scratch: Path) -> dict:
    overrides, budget = ARMS[name]
    out = RunDir(scratch / name)
    out.root.mkdir(parents=True)
    for folder in ("data", "tokenizer"):
        (out.root / folder).symlink_to((source.root / folder).resolve())
    cfg = resolve("cpu", overrides=[*overrides, *COMMON])
    if budget == "minutes":
        cfg.pretrain.minutes = minutes
    else:   # the dense arm's FLOPs at this model's FLOPs per token
        with torch.device("meta"):
            probe = Transformer(pretrain.model_config(cfg, pretrain.load_data(out)[0]))
        cfg.pretrain.max_tokens = int(flops_budget / probe.flops_per_token(cfg.pretrain.seq_len))
    summary = pretrain.run(cfg, out, show_progress=False)
    model, _, _ = load_model(out.ckpt("base"), kinds=("base",))
    model.eval()
    row = {"name": name, "bpb": heldout_bpb(model, out), "tokens": summary["tokens"],
           "seconds": summary["elapsed_s"], "tok_s": summary["tokens"] / max(summary["elapsed_s"], 1e-9),
           "params": model.num_params(), "active": model.active_params(),
           "flops_per_token": model.flops_per_token(cfg.pretrain.seq_len)}
    row["flops"] = row["flops_per_token"] * row["tokens"]
    if model.cfg.moe_router == "expert_choice":
        with batch_routing_at_eval(model):
            row["bpb_training_router"] = heldout_bpb(model, out)
    records = [r for r in out.read_metrics("pretrain") if "loss" in r and "step" in r]
    row["balance"] = balance(records, warmup=max(cfg.pretrain.warmup_steps, summary["steps"] // 3))
    row["records"] = [{k: v for k, v in r.items() if k == "step" or k.startswith("moe_")} for r in records]
    return row


def step_profile(steps: int = 4) -> None:
    """Seconds per training step of the `cpu` and `cpu-moe` models on random tokens (batch 16 x 256):
    forward + backward (with the router losses) and the optimizer step, after two warm-up steps."""
    for preset in ("cpu", "cpu-moe"):
        cfg = resolve(preset)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        opt = build_optimizer(model, cfg.pretrain, "cpu")
        x = torch.randint(0, cfg.model.vocab_size, (cfg.pretrain.batch_size, cfg.pretrain.seq_len))
        passes, updates = [], []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            _, loss = model(x, targets=x)
            (loss + router_losses(moe_layers(model))[0]).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                passes.append(t1 - t0)
                updates.append(time.perf_counter() - t1)
        print(f"{preset:8s} forward + backward {sum(passes) / steps:.3f} s, optimizer {sum(updates) / steps:.3f} s")
        # Muon's Newton-Schulz as the optimizer runs it (same-shape matrices in one batch) against
        # one matrix at a time (how it ran before), on this model's momenta
        mats = [opt.state[p]["momentum_buffer"] for g in opt.param_groups if g["muon"] for p in g["params"]]
        shapes: dict[tuple, list] = {}
        for m in mats:
            shapes.setdefault(tuple(m.shape), []).append(m)
        alone = min(timed(lambda: [orthogonalize(m) for m in mats]) for _ in range(3))
        batched = min(timed(lambda: [orthogonalize(torch.stack(ms)) for ms in shapes.values()]) for _ in range(3))
        print(f"{'':8s} Newton-Schulz on its {len(mats)} Muon matrices ({len(shapes)} shapes): one at a time "
              f"{alone:.3f} s, batched by shape {batched:.3f} s ({alone / batched:.1f}x)")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [n for n in ("tc", "tc-noaux", "ec") if n in rows]
    keys = expert_load_keys(rows[shown[0]]["records"])
    fig, axes = plt.subplots(len(shown), len(keys), figsize=(3.0 * len(keys), 2.6 * len(shown)), squeeze=False)
    for ax_row, name in zip(axes, shown):
        draw_expert_load(ax_row, rows[name]["records"], keys, label=f"{name}, ")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a run directory with prepared `cpu` data (llmforge data prepare); only read")
    ap.add_argument("--minutes", type=float, default=2.0, help="wall-clock pretraining minutes of the equal-time arms")
    ap.add_argument("--only", default="", help="comma-separated arms (default: all; dense always): " + ", ".join(ARMS))
    ap.add_argument("--out", default="runs/moe_vs_dense", help="folder for expert_load.png and results.json")
    ap.add_argument("--profile", action="store_true", help="only time a training step of each model")
    args = ap.parse_args()
    if args.profile:
        return step_profile()
    if not args.run:
        ap.error("give a run directory with prepared data (or --profile)")
    names = ["dense"] + [n for n in (args.only.split(",") if args.only else ARMS) if n and n != "dense"]
    peak = measured_peak_flops(torch.device("cpu"), None)
    scratch = Path(tempfile.mkdtemp(prefix="llmforge-moe-"))
    rows: dict[str, dict] = {}
    try:
        for name in names:
            flops = rows["dense"]["flops"] if "dense" in rows else None
            rows[name] = run_arm(RunDir(args.run), name, args.minutes, flops, scratch)
            r = rows[name]
            print(f"{name}: bpb {r['bpb']:.4f}, {r['tokens']:,} tokens in {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = rows["dense"]
    print(f"\n{args.minutes:g}-minute arms and equal-FLOPs arms; held-out bpb on the whole validation split; "
          f"MFU by active parameters against a {peak / 1e9:.0f} GFLOP/s fp32 matmul peak")
    print(f"{'arm':9s} {'params':>7s} {'active':>7s} {'tokens':>10s} {'PFLOP':>6s} {'tok/s':>7s} {'MFU':>5s} "
          f"{'bpb':>7s} {'bpb/dense':>9s} {'tok/s/dense':>11s} {'max/mean load':>13s}")
    for r in rows.values():
        r["mfu"] = r["tok_s"] * r["flops_per_token"] / peak
        load = f"{r['balance']:.2f}" if r["balance"] is not None else "-"
        print(f"{r['name']:9s} {r['params'] / 1e6:6.2f}M {r['active'] / 1e6:6.2f}M {r['tokens']:10,d} "
              f"{r['flops'] / 1e15:6.3f} {r['tok_s']:7,.0f} {r['mfu']:5.1%} {r['bpb']:7.4f} "
              f"{r['bpb'] / dense['bpb']:9.3f} {r['tok_s'] / dense['tok_s']:11.3f} {load:>13s}")
    for r in rows.values():
        if "bpb_training_router" in r:
            print(f"{r['name']}: held-out bpb {r['bpb_training_router']:.4f} with the training router (experts choose "
                  f"over the batch) vs {r['bpb']:.4f} decoding by token choice: gap {r['bpb'] - r['bpb_training_router']:+.4f}")
    if {"tc", "tc-noaux", "ec"} & set(rows):
        plot(rows, out / "expert_load.png")
        print(f"expert load over steps: {out / 'expert_load.png'}")
    (out / "results.json").write_text(json.dumps({"minutes": args.minutes, "peak_flops": peak, "arms": rows}, indent=1))


if __name__ == "__main__":
    main()
