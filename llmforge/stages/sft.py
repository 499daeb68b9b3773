"""Supervised fine-tuning: the base model learns the chat format on gold task and conversation
data (+ spelling drills, + the user's own JSONL), with the loss on assistant tokens only, while a
share of every batch stays pretraining text so the corpus is not forgotten -> ckpt/sft.

    llmforge sft --out runs/demo [--set sft.user_data=my_chats.jsonl] [--set sft.text_share=0.2]

Held-out verified accuracy per task (evaluation-only phrasings and content) is measured through
the engine at every eval, and held-out bits/byte on the pretraining validation text beside it.
"""
from __future__ import annotations

import torch

from llmforge.config import Config
from llmforge.eval import bpb
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.chat_data import ChatRows, conversations, mixed_batch
from llmforge.stages.pretrain import load_data
from llmforge.stages.common import lm_batch
from llmforge.tasks import task_names
from llmforge.tokenizer.chat import render
from llmforge.train import distributed
from llmforge.train.checkpoint import load_run_checkpoint, load_run_tokenizer
from llmforge.train.loop import Checkpointing, train

STAGE = "sft"


def run(cfg: Config, run: RunDir, resume: bool = False, show_progress: bool = True) -> dict:
    tc = cfg.sft
    ctx = distributed.setup()
    tok, train_text, val_text = load_run_tokenizer(run), None, None
    if (run.data / "manifest.json").is_file():   # a run built from an imported model has no shards
        tok, train_text, val_text = load_data(run)
    elif tc.text_share > 0 and ctx.is_main:
        print(f"sft: {run.data} has no pretraining shards; training on conversations only (sft.text_share ignored)")
    model, base_cfg = load_run_checkpoint(run, "base", ("base",), tok,
                                      f"run `llmforge pretrain --out {run.root}` first")
    names = task_names(cfg.tasks.names)
    seq_len = min(tc.seq_len, model.cfg.max_seq_len)
    chat = ChatRows(tok, conversations(names, tc.examples_per_task, tc.spelling_examples, tc.user_data, tc.seed,
                                       copying=tc.copy_examples),
                    seq_len, tc.packing)
    heldout_convs = [render(tok, item.conversation) for item in task_eval.heldout(names, 8)]
    val = lm_batch(heldout_convs, seq_len, tok.eot_id)
    B = tc.batch_size
    if ctx.is_main:
        print(f"sft: {chat.conversations} conversations in {len(chat)} rows of {seq_len} tokens "
              f"({chat.truncated} truncated), {chat.trained_tokens} trained tokens, "
              f"{tc.text_share if train_text is not None else 0:.0%} of rows pretraining text, tasks: {', '.join(names)}")

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        return mixed_batch(g, B * ctx.world, slice(ctx.rank * B, (ctx.rank + 1) * B), seq_len, chat,
                           train_text, tc.text_share, draw=step * tc.grad_accum + micro, seed=tc.seed)

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"])
        return loss, {}

    def eval_fn(model):
        _, val_loss = model(val["input_ids"], targets=val["targets"], loss_mask=val["loss_mask"])
        acc = task_eval.evaluate(model, tok, names, tc.eval_per_task, max_tokens=cfg.tasks.max_new_tokens)
        return {"val_loss": float(val_loss), "acc_mean": acc["mean"]["accuracy"],
                **{f"acc_{n}": acc[n]["accuracy"] for n in names},
                **({"val_bpb": text_bpb(model)} if val_text is not None else {})}

    token_bytes = bpb.token_bytes(tok, model.cfg.vocab_size)

    def text_bpb(model) -> float:   # the pretraining validation text, as pretraining's eval scores it
        return bpb.heldout(model, val_text, token_bytes, model.cfg.max_seq_len, eot_id=tok.eot_id,
                           max_tokens=tc.eval_batches * B * ctx.world * model.cfg.max_seq_len)["val_bpb"]

    ckpt = Checkpointing(run.ckpt("sft"), "sft", model.cfg, tok, {"preset": cfg.preset, "tasks": names})
    try:
        summary = train(model, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                        eval_fn=eval_fn, resume=resume, show_progress=show_progress)
    finally:
        distributed.teardown()
    return summary
