"""Reward models: the SFT transformer with a scalar head read at the last token, trained with
the Bradley–Terry loss (+ Llama 2's margin) on preference pairs -> ckpt/rm (helpfulness) and
ckpt/rm_safety (safety). Scores are normalized to mean 0 / std 1 on a reference set (every
response of the train pairs); rl/common.CombinedReward combines the two as Llama 2 does.

    llmforge rm --out runs/demo [--set rm.user_prefs=my_pairs.jsonl] [--set rm.margin=false]
"""
from __future__ import annotations

import copy
import json
import random

import torch

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.model.heads import ScalarHeadModel
from llmforge.run import RunDir, write_json_atomic
from llmforge.stages import prefs
from llmforge.stages.rl.common import load_checkpoint, load_tokenizer, pad, score_sequences
from llmforge.stages.rl.objectives import bradley_terry_loss
from llmforge.tasks.safety import is_refusal
from llmforge.tokenizer.chat import render
from llmforge.train import distributed
from llmforge.train.loop import Checkpointing, train


def encode_pairs(tok, pairs: list[dict], max_len: int):
    """Each pair -> (chosen ids, rejected ids, margin), keeping the last max_len tokens (the
    score is read at the end, so the end must survive truncation)."""
    out = []
    for p in pairs:
        chosen = render(tok, p["prompt"] + p["chosen"])[0][-max_len:]
        rejected = render(tok, p["prompt"] + p["rejected"])[0][-max_len:]
        if chosen != rejected:
            out.append((chosen, rejected, float(p.get("margin", 0.0))))
    return out


def pair_batch(encoded, pick, pad_id: int) -> dict:
    rows = [encoded[i] for i in pick]
    seqs = [c for c, _, _ in rows] + [r for _, r, _ in rows]
    return {"input_ids": pad(seqs, pad_id), "lengths": torch.tensor([len(s) for s in seqs]),
            "margin": torch.tensor([m for _, _, m in rows])}


def pairwise_accuracy(model, encoded, pad_id: int) -> float:
    chosen = score_sequences(model, [c for c, _, _ in encoded], pad_id)
    rejected = score_sequences(model, [r for _, r, _ in encoded], pad_id)
    return float((chosen > rejected).float().mean())


def train_one(cfg: Config, run: RunDir, tok, sft_model, name: str, train_pairs, heldout_pairs, ctx,
              show_progress: bool) -> dict:
    rc = cfg.rm
    max_len = sft_model.cfg.max_seq_len
    train_enc = encode_pairs(tok, train_pairs, max_len)
    heldout_enc = encode_pairs(tok, heldout_pairs, max_len)
    if not train_enc:
        raise UserError(f"{name}: no usable preference pairs after filtering; build more with "
                        "rm.prompts_per_task or add rm.user_prefs")
    torch.manual_seed(rc.seed)
    model = ScalarHeadModel(sft_model)
    B = rc.batch_size
    pad_id = tok.eot_id

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(rc.seed * 1_000_003 + step * 1_009 + micro)
        pick = torch.randint(0, len(train_enc), (B * ctx.world,), generator=g)[ctx.rank * B:(ctx.rank + 1) * B]
        return pair_batch(train_enc, pick.tolist(), pad_id)

    def loss_fn(model, batch):
        values = model(batch["input_ids"])
        scores = values[torch.arange(len(values)), batch["lengths"] - 1]
        chosen, rejected = scores.chunk(2)
        margin = batch["margin"] if rc.margin else None
        loss = bradley_terry_loss(chosen, rejected, margin)
        return loss, {"train_acc": float((chosen > rejected).float().mean())}

    def eval_fn(model):
        return {"heldout_acc": pairwise_accuracy(model, heldout_enc, pad_id) if heldout_enc else float("nan")}

    meta = {"preset": cfg.preset, "head": "scalar", "reward": name}
    ckpt = Checkpointing(run.ckpt(name), name, sft_model.cfg, tok, meta)
    summary = train(model, rc, run, stage=name, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=eval_fn, show_progress=show_progress)
    # normalization on the reference set: every response of the train pairs
    model.eval()
    with torch.no_grad():
        ref = score_sequences(model, [c for c, _, _ in train_enc] + [r for _, r, _ in train_enc], pad_id)
    stats = {"reward_mean": float(ref.mean()), "reward_std": float(ref.std().clamp(min=1e-6)),
             "heldout_acc": summary.get("heldout_acc"), "train_pairs": len(train_enc),
             "heldout_pairs": len(heldout_enc)}
    if ctx.is_main:
        config_path = run.ckpt(name) / "config.json"
        write_json_atomic(config_path, {**json.loads(config_path.read_text()), **stats})
        run.log(name, event="normalized", **stats)
    return {**summary, **stats}


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    ctx = distributed.setup()
    tok = load_tokenizer(run)
    sft_model, _ = load_checkpoint(run, "sft", ("sft",), tok, f"run `llmforge sft --out {run.root}` first")
    train_path, heldout_path = run.prefs / "train.jsonl", run.prefs / "heldout.jsonl"
    if not (train_path.is_file() and heldout_path.is_file()):
        if ctx.is_main:        # one process samples and writes the pairs; the others read them
            prefs.build(cfg, run, sft_model, tok)
        if ctx.enabled:
            torch.distributed.barrier()
    train_pairs, heldout_pairs = prefs.load_pairs(train_path), prefs.load_pairs(heldout_path)
    results = {}
    try:
        # helpfulness: every pair except "refuse the harmful request" (that is the safety model's job)
        helpful = [p for p in train_pairs if not (p["source"] == "safety" and _is_refusal_pair(p))]
        helpful_heldout = [p for p in heldout_pairs if not (p["source"] == "safety" and _is_refusal_pair(p))]
        results["rm"] = train_one(cfg, run, tok, _copy(sft_model), "rm", helpful, helpful_heldout, ctx,
                                  show_progress)
        # safety: the safety pairs, mixed with as many helpfulness pairs so that its scores on
        # ordinary prompts are meaningful too (Llama 2 mixes the two kinds of data in both models)
        safety = [p for p in train_pairs if p.get("safety")]
        if cfg.rm.safety and safety:
            others = [p for p in train_pairs if not p.get("safety")]
            mix = safety + random.Random(cfg.rm.seed).sample(others, min(len(others), len(safety)))
            results["rm_safety"] = train_one(cfg, run, tok, _copy(sft_model), "rm_safety", mix,
                                             [p for p in heldout_pairs if p.get("safety")], ctx, show_progress)
    finally:
        distributed.teardown()
    return results


def _is_refusal_pair(pair: dict) -> bool:
    return is_refusal(pair["chosen"][-1].get("content") or "")


def _copy(model):
    return copy.deepcopy(model)
