"""Pretraining ablations at equal wall-clock minutes: which choices pay on this machine?

    python bench/pretrain_ablations.py runs/cpu --minutes 3
    python bench/pretrain_ablations.py runs/cpu --minutes 3 --only ctx256,ctx512,ctx1024

Every variant pretrains the `cpu` preset's model from scratch on RUN's shards for the same
minutes (the lr schedule stretched to fit, no midtraining), one after another in this process
(never two at once: on 2 cores they would slow each other 3-5x), then is scored by the one
held-out bpb function (eval/bpb.heldout) on the whole validation split at its own context
length. A table of final bpb, tokens seen and tokens/s is printed; the differences, not the
absolute numbers, are the result (short runs; each variant is one seed).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from llmforge.config import resolve
from llmforge.eval import bpb
from llmforge.run import RunDir
from llmforge.stages import pretrain
from llmforge.train.checkpoint import load_model

VARIANTS = {  # overrides on top of the `cpu` preset (Muon at 0.05 for the blocks, AdamW at 1e-2 for the rest)
    "baseline": [],
    "adamw": ["pretrain.optimizer=adamw", "pretrain.lr=3e-3"],           # the preset before Muon
    "muon-lr05": ["pretrain.lr=3e-3"],                                   # Muon, the rest at AdamW's old lr
    "muon-lr02": ["pretrain.lr=3e-3", "pretrain.muon_lr=0.02"],
    "adam2e-2": ["pretrain.lr=2e-2"],
    "b8": ["pretrain.batch_size=8"],
    "ctx256": ["model.max_seq_len=256", "pretrain.seq_len=256", "pretrain.batch_size=16"],
    "ctx512": ["model.max_seq_len=512", "pretrain.seq_len=512", "pretrain.batch_size=8"],
    "ctx1024": ["model.max_seq_len=1024", "pretrain.seq_len=1024", "pretrain.batch_size=4"],
    "wsd": ["pretrain.schedule=wsd"],
    "untied": ["model.tie_embeddings=false"],
    "zero-init": ["model.zero_init_residual=true"],                       # blocks start as the identity
    "qk-norm": ["model.qk_norm=true"],                                    # RMSNorm on each head's q and k
}


def run_variant(source: RunDir, name: str, overrides: list[str], minutes: float, scratch: Path) -> dict:
    out = RunDir(scratch / name)
    out.root.mkdir(parents=True, exist_ok=True)
    for folder in ("data", "tokenizer"):
        if not (out.root / folder).exists():
            (out.root / folder).symlink_to((source.root / folder).resolve())
    cfg = resolve("cpu", overrides=[*overrides, f"pretrain.minutes={minutes}", "pretrain.max_steps=1000000", "pretrain.plan_after=0",
                                    "pretrain.mid_fraction=0", "pretrain.eval_every=0", "pretrain.sample_every=0",
                                    "pretrain.ckpt_every=0", "pretrain.eval_tasks_per_task=0"])
    summary = pretrain.run(cfg, out, show_progress=True)
    model, _, _ = load_model(out.ckpt("base"), kinds=("base",))
    tok, _, val = pretrain.load_data(out)
    model.eval()
    with torch.no_grad():
        score = bpb.heldout(model, val, bpb.token_bytes(tok, model.cfg.vocab_size), model.cfg.max_seq_len,
                            eot_id=tok.eot_id)
    return {"name": name, "bpb": score["val_bpb"], "context": model.cfg.max_seq_len, "tokens": summary["tokens"],
            "tok_s": summary["tokens"] / max(summary["elapsed_s"], 1e-9), "params": model.num_params()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory with prepared data (llmforge data prepare)")
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock pretraining minutes per variant")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    scratch = Path(tempfile.mkdtemp(prefix="llmforge-ablations-"))
    rows = []
    try:
        for name in names:
            rows.append(run_variant(RunDir(args.run), name, VARIANTS[name], args.minutes, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = rows[0]["bpb"]
    print(f"\n{args.minutes:g} minutes each, held-out bpb on the whole validation split at each model's context")
    print(f"{'variant':10s} {'context':>7s} {'params':>8s} {'tokens':>10s} {'tok/s':>8s} {'bpb':>7s} {'vs first':>8s}")
    for r in rows:
        print(f"{r['name']:10s} {r['context']:7d} {r['params'] / 1e6:7.2f}M {r['tokens']:10,d} {r['tok_s']:8,.0f} "
              f"{r['bpb']:7.4f} {r['bpb'] / base:8.3f}")


if __name__ == "__main__":
    main()
