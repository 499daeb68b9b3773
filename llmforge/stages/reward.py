"""Reward models: the SFT transformer with a scalar head read at the last token, trained with
the Bradley–Terry loss (+ Llama 2's margin) on preference pairs -> ckpt/rm (helpfulness) and
ckpt/rm_safety (safety). Scores are normalized to mean 0 / std 1 on a reference set (a sample of
the train pairs' responses); rl/rewards.CombinedReward combines the two as Llama 2 does.
Where a task's verifier can grade a response, the reward RL and rejection sampling optimise is
`verifier_plus_rm` (below): the verifier decides, the RM only ranks within a verdict.

Held-out pairwise accuracy is reported per pair source (form, helpfulness, refusal, format,
verifier and its number-only subset; see stages/prefs.py) in metrics.jsonl (the "normalized"
event) and in the checkpoint's config.json; the safety model also reports its accuracy on
harmful requests and its false-refusal rate on benign-but-edgy ones.

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
from llmforge.stages.common import pad
from llmforge.stages.rl.rewards import score_sequences
from llmforge.stages.rl.objectives import bradley_terry_loss
from llmforge.tasks.safety import is_refusal
from llmforge.tokenizer.chat import END, render
from llmforge.train import distributed
from llmforge.train.checkpoint import load_run_checkpoint, load_run_tokenizer
from llmforge.train.loop import Checkpointing, train

REFERENCE_SIZE = 1024   # responses of the train pairs the scores are normalized on (a random sample)


def verifier_plus_rm(verified: torch.Tensor | None, rm_score: torch.Tensor, weight: float = 0.2) -> torch.Tensor:
    """The reward for RL and rejection sampling where correctness can be checked (as production
    RLHF pipelines do for verifiable domains):

        reward = verified + weight * tanh(rm_score)   where a verifier grades the response
        reward = rm_score                              where none does (verified is None or NaN)

    `verified` is the task verifier's reward in [0, 1] per response (NaN for a response no
    verifier applies to), `rm_score` the normalized (mean 0 / std 1) reward-model score. tanh
    bounds the RM's part to (-weight, +weight), so with weight <= 0.5 a verified-correct answer
    (1) always outranks a wrong one (0): the RM only breaks ties between answers the verifier
    grades alike (form, length, tone), and cannot be hacked into overturning the verifier."""
    rm_score = rm_score.float()
    if verified is None:
        return rm_score
    verified = verified.to(rm_score.dtype)
    graded = verified + weight * torch.tanh(rm_score)
    return torch.where(torch.isnan(verified), rm_score, graded)


def encode_pairs(tok, pairs: list[dict], max_len: int):
    """Each pair -> (chosen ids, rejected ids, margin), keeping the last max_len tokens (the
    score is read at the end, so the end must survive truncation). A rejected response that never
    ended ("rejected_ended": false) loses its closing <|end|>, as a cut-off RL sample has none.
    Returns (encoded, the pairs kept, in the same order)."""
    end_id = tok.token_id(END)
    out, kept = [], []
    for p in pairs:
        chosen = render(tok, p["prompt"] + p["chosen"])[0]
        rejected = render(tok, p["prompt"] + p["rejected"])[0]
        if p.get("rejected_ended") is False and rejected[-1] == end_id:
            rejected = rejected[:-1]
        chosen, rejected = chosen[-max_len:], rejected[-max_len:]
        if chosen != rejected:
            out.append((chosen, rejected, float(p.get("margin", 0.0))))
            kept.append(p)
    return out, kept


def best_of_n(model, tok, groups: list[dict], pad_id: int) -> dict:
    """What rejection sampling would get from this RM: for each held-out prompt, the verified
    reward of the sample it scores highest ("pick"), against the average sample ("mean") and the
    best any pick could do ("any" = pass@n). A useful RM has mean < pick <= any."""
    groups = [g for g in groups if len(g["responses"]) >= 2]
    if not groups:
        return {}
    end_id, max_len = tok.token_id(END), model.trunk.cfg.max_seq_len
    seqs = []
    for g in groups:
        for r in g["responses"]:
            ids = render(tok, g["prompt"] + r["messages"])[0]
            seqs.append((ids if r["ended"] or ids[-1] != end_id else ids[:-1])[-max_len:])
    scores = score_sequences(model, seqs, pad_id).tolist()
    pick = mean_ = any_ = 0.0
    k = 0
    for g in groups:
        verified = [float(r["verified"] >= 1.0) for r in g["responses"]]
        s = scores[k:k + len(verified)]
        k += len(verified)
        pick += verified[max(range(len(s)), key=s.__getitem__)]
        mean_ += sum(verified) / len(verified)
        any_ += max(verified)
    n = len(groups)
    return {"bon_prompts": n, "bon_verified_pick": pick / n, "bon_verified_mean": mean_ / n,
            "bon_verified_any": any_ / n}


def pair_batch(encoded, pick, pad_id: int) -> dict:
    rows = [encoded[i] for i in pick]
    seqs = [c for c, _, _ in rows] + [r for _, r, _ in rows]
    return {"input_ids": pad(seqs, pad_id), "lengths": torch.tensor([len(s) for s in seqs]),
            "margin": torch.tensor([m for _, _, m in rows])}


def pair_scores(model, encoded, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = score_sequences(model, [c for c, _, _ in encoded], pad_id)
    rejected = score_sequences(model, [r for _, r, _ in encoded], pad_id)
    return chosen, rejected


def train_one(cfg: Config, run: RunDir, tok, sft_model, name: str, train_pairs, heldout_pairs, ctx,
              show_progress: bool, heldout_samples: list[dict] | None = None) -> dict:
    rc = cfg.rm
    max_len = sft_model.cfg.max_seq_len
    train_enc, _ = encode_pairs(tok, train_pairs, max_len)
    heldout_enc, heldout_kept = encode_pairs(tok, heldout_pairs, max_len)
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
        return loss, {"train_acc": (chosen > rejected).float().mean()}

    final = {}   # the held-out scores of the loop's last eval, which is always of the final weights

    def eval_fn(model):
        if not heldout_enc:
            return {"heldout_acc": float("nan")}
        final["scores"] = chosen, rejected = pair_scores(model, heldout_enc, pad_id)
        return {"heldout_acc": float((chosen > rejected).float().mean())}

    meta = {"preset": cfg.preset, "head": "scalar", "reward": name}
    ckpt = Checkpointing(run.ckpt(name), name, sft_model.cfg, tok, meta)
    summary = train(model, rc, run, stage=name, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=eval_fn, show_progress=show_progress)
    # normalization on the reference set (REFERENCE_SIZE of the train pairs' responses)
    model.eval()
    with torch.no_grad():
        ref = [c for c, _, _ in train_enc] + [r for _, r, _ in train_enc]
        ref = score_sequences(model, random.Random(rc.seed).sample(ref, min(len(ref), REFERENCE_SIZE)), pad_id)
        by_source = prefs.accuracy_by_group(*final["scores"], heldout_kept) if heldout_enc else {}
        bon = best_of_n(model, tok, heldout_samples or [], pad_id)
    stats = {"reward_mean": float(ref.mean()), "reward_std": float(ref.std().clamp(min=1e-6)),
             "heldout_acc": by_source["all"]["acc"] if by_source else summary.get("heldout_acc"),
             "train_pairs": len(train_enc), "heldout_pairs": len(heldout_enc),
             "train_sources": _counts(train_pairs), **prefs.flat_metrics(by_source), **bon}
    if ctx.is_main:
        config_path = run.ckpt(name) / "config.json"
        write_json_atomic(config_path, {**json.loads(config_path.read_text()), **stats})
        run.log(name, event="normalized", **stats)
    return {**summary, **stats}


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    ctx = distributed.setup()
    tok = load_run_tokenizer(run)
    sft_model, _ = load_run_checkpoint(run, "sft", ("sft",), tok, f"run `llmforge sft --out {run.root}` first")
    train_path, heldout_path = run.prefs / "train.jsonl", run.prefs / "heldout.jsonl"
    if not (train_path.is_file() and heldout_path.is_file()):
        if ctx.is_main:        # one process samples and writes the pairs; the others read them
            prefs.build(cfg, run, sft_model, tok)
        if ctx.enabled:
            torch.distributed.barrier()
    train_pairs, heldout_pairs = prefs.load_pairs(train_path), prefs.load_pairs(heldout_path)
    samples_path = run.prefs / "heldout_samples.jsonl"
    samples = prefs.load_samples(samples_path) if samples_path.is_file() else []
    results = {}
    try:
        # helpfulness: every pair except "refuse the harmful request" (that is the safety model's job)
        helpful = [p for p in train_pairs if not (p.get("safety") and _is_refusal_pair(p))]
        helpful_heldout = [p for p in heldout_pairs if not (p.get("safety") and _is_refusal_pair(p))]
        results["rm"] = train_one(cfg, run, tok, _copy(sft_model), "rm", helpful, helpful_heldout, ctx,
                                  show_progress, samples)
        # safety: the safety pairs, mixed with as many helpfulness pairs so that its scores on
        # ordinary prompts are meaningful too (Llama 2 mixes the two kinds of data in both models)
        safety = [p for p in train_pairs if p.get("safety")]
        if cfg.rm.safety and safety:
            others = [p for p in train_pairs if not p.get("safety")]
            mix = safety + random.Random(cfg.rm.seed).sample(others, min(len(others), len(safety)))
            results["rm_safety"] = train_one(cfg, run, tok, _copy(sft_model), "rm_safety", mix,
                                             [p for p in heldout_pairs if p.get("safety")], ctx, show_progress,
                                             [g for g in samples if g.get("safety")])
    finally:
        distributed.teardown()
    return results


def _is_refusal_pair(pair: dict) -> bool:
    return is_refusal(pair["chosen"][-1].get("content") or "")


def _counts(pairs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.get("source", "user")] = counts.get(p.get("source", "user"), 0) + 1
    return counts


def _copy(model):
    return copy.deepcopy(model)
