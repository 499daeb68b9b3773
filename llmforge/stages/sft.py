"""Supervised fine-tuning: the base model learns the chat format on gold task conversations
(+ the user's own JSONL), with the loss on assistant tokens only -> ckpt/sft.

    llmforge sft --out runs/demo [--set sft.user_data=my_chats.jsonl] [--set sft.packing=false]

Held-out verified accuracy per task is measured through the engine at every eval.
"""
from __future__ import annotations

import random

import torch

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl.common import lm_batch, load_checkpoint, load_tokenizer
from llmforge.tasks import get_task, task_names
from llmforge.tasks.user_data import load_conversations
from llmforge.tokenizer.chat import render
from llmforge.train import distributed
from llmforge.train.loop import Checkpointing, train

STAGE = "sft"


def conversations(cfg: Config) -> list[list[dict]]:
    """Gold conversations of every task's train items, plus the user's JSONL, shuffled."""
    convs = []
    for name in task_names(cfg.sft.tasks):
        convs += [item.conversation for item in get_task(name).train_items(cfg.sft.examples_per_task)]
    if cfg.sft.user_data:
        convs += load_conversations(cfg.sft.user_data)
    random.Random(cfg.sft.seed).shuffle(convs)
    return convs


def pack(seqs: list[tuple[list[int], list[int]]], width: int, pad_id: int, packing: bool):
    """Rows of exactly `width` tokens (ids, mask). With packing, whole conversations are placed
    greedily one after another in a row (none is split); without, one conversation per row.
    A conversation longer than a row is truncated (its tail is lost, and counted)."""
    rows, cur_ids, cur_mask, truncated = [], [], [], 0
    for ids, mask in seqs:
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
        if cur_ids and (not packing or len(cur_ids) + len(ids) > width):
            rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    masks = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        masks[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, masks, truncated


def run(cfg: Config, run: RunDir, resume: bool = False, show_progress: bool = True) -> dict:
    tc = cfg.sft
    ctx = distributed.setup()
    tok = load_tokenizer(run)
    model, base_cfg = load_checkpoint(run, "base", ("base",), tok,
                                      f"run `llmforge pretrain --out {run.root}` first")
    names = task_names(tc.tasks)
    seq_len = min(tc.seq_len, model.cfg.max_seq_len)
    seqs = [render(tok, conv) for conv in conversations(cfg)]
    seqs = [s for s in seqs if sum(s[1][1:seq_len + 1]) > 0]   # something to learn inside the window
    if not seqs:
        raise UserError("SFT has no conversations with assistant tokens inside the context; "
                        "raise sft.examples_per_task or model.max_seq_len")
    rows, masks, truncated = pack(seqs, seq_len + 1, tok.eot_id, tc.packing)
    heldout_convs = [render(tok, item.conversation) for item in task_eval.heldout(names, 8)]
    val = lm_batch(heldout_convs, seq_len, tok.eot_id)
    B = tc.batch_size
    if ctx.is_main:
        print(f"sft: {len(seqs)} conversations in {len(rows)} rows of {seq_len} tokens "
              f"({truncated} truncated), {int(masks.sum())} trained tokens, tasks: {', '.join(names)}")

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        pick = torch.randint(0, len(rows), (B * ctx.world,), generator=g)[ctx.rank * B:(ctx.rank + 1) * B]
        r, m = rows[pick], masks[pick]
        return {"input_ids": r[:, :-1], "targets": r[:, 1:], "loss_mask": m[:, 1:]}

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"])
        return loss, {}

    def eval_fn(model):
        _, val_loss = model(val["input_ids"], targets=val["targets"], loss_mask=val["loss_mask"])
        acc = task_eval.evaluate(model, tok, names, tc.eval_per_task, max_tokens=cfg.rl.max_new_tokens)
        return {"val_loss": float(val_loss), "acc_mean": acc["mean"]["accuracy"],
                **{f"acc_{n}": acc[n]["accuracy"] for n in names}}

    ckpt = Checkpointing(run.ckpt("sft"), "sft", model.cfg, tok, {"preset": cfg.preset, "tasks": names})
    try:
        summary = train(model, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                        eval_fn=eval_fn, resume=resume, show_progress=show_progress)
    finally:
        distributed.teardown()
    return summary
