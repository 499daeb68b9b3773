"""Pretraining: next-token prediction on the packed shards -> ckpt/base.

    llmforge pretrain --out runs/demo [--preset cpu] [--minutes 10] [--resume]
    torchrun --standalone --nproc_per_node=2 -m llmforge.cli pretrain --out runs/demo
"""
from __future__ import annotations

import dataclasses
import time

import torch

from llmforge.config import Config
from llmforge.data.shards import TokenShards, read_manifest
from llmforge.errors import UserError
from llmforge.eval import bpb
from llmforge.eval import tasks as task_eval
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.stages.chat_data import ChatRows, conversations, mixed_batch
from llmforge.tasks import task_names
from llmforge.tokenizer.bpe import Tokenizer
from llmforge.train import distributed
from llmforge.train.loop import Checkpointing, train

STAGE = "pretrain"


def load_data(run: RunDir):
    if not run.tokenizer.is_file():
        raise UserError(f"{run.tokenizer} is missing; run `llmforge data prepare --out {run.root}` first")
    tok = Tokenizer.load(run.tokenizer)
    manifest_path = run.data / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} is missing; run `llmforge data prepare --out {run.root}` first")
    manifest = read_manifest(run.data)  # a UserError, not a traceback, when it is corrupt
    if manifest.get("tokenizer_hash") not in (None, tok.hash):
        raise UserError(f"the shards in {run.data} were made with another tokenizer than {run.tokenizer}; "
                        f"re-run `llmforge data prepare --out {run.root}`")
    return tok, TokenShards(run.data, "train"), TokenShards(run.data, "val")


def model_config(cfg: Config, tok: Tokenizer):
    mc = dataclasses.replace(cfg.model)
    if tok.vocab_size > mc.vocab_size:  # round up to a multiple of 64 for friendlier matmuls
        mc.vocab_size = 64 * -(-tok.vocab_size // 64)
    if cfg.pretrain.seq_len > mc.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.pretrain.seq_len} is longer than model.max_seq_len="
                        f"{mc.max_seq_len}; lower the sequence length or raise the model's context")
    mc.validate()
    return mc


def run(cfg: Config, run: RunDir, resume: bool = False, show_progress: bool = True) -> dict:
    tc = cfg.pretrain
    ctx = distributed.setup()
    tok, train_data, val_data = load_data(run)
    mc = model_config(cfg, tok)
    torch.manual_seed(tc.seed)
    model = Transformer(mc)
    token_bytes = bpb.token_bytes(tok, mc.vocab_size)
    B, T = tc.batch_size, tc.seq_len
    if ctx.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {train_data.num_tokens:,} train tokens, "
              f"batch {B * tc.grad_accum * ctx.world} x {T}, world {ctx.world}")

    # midtraining: from mid_start on, a share of every batch is conversations (chat format, tasks'
    # train side, spelling drills) with the assistant-only loss, so the base model meets the
    # format before SFT. Step-based, so resume and DDP stay exact; under a minutes budget the
    # loop's plan (pretrain.plan_after) fixes max_steps, and with it mid_start, early on.
    def mid_start() -> int:
        return int(tc.max_steps * (1 - tc.mid_fraction))

    chat = None
    if tc.mid_fraction > 0:
        chat = ChatRows(tok, conversations(task_names(cfg.tasks.names), tc.mid_examples_per_task,
                                           tc.mid_spelling_examples, seed=tc.seed, offset=2_000_000,
                                           copying=tc.mid_copy_examples), T)
        if ctx.is_main:
            when = f"from step {mid_start()}" if tc.minutes <= 0 else f"for the last {tc.mid_fraction:.0%} of the steps"
            print(f"pretrain: midtraining {when}: {tc.mid_chat_share:.0%} of rows from "
                  f"{chat.conversations} conversations")

    def get_batch(step, micro, ctx):
        # the global batch of this (step, micro) is fixed by the seed; each rank reads its rows
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        rows = slice(ctx.rank * B, (ctx.rank + 1) * B)
        if chat is not None and step >= mid_start():
            return mixed_batch(g, B * ctx.world, rows, T, chat, train_data, 1 - tc.mid_chat_share,
                               draw=(step - mid_start()) * tc.grad_accum + micro, seed=tc.seed)
        x, y = train_data.sample_batch(B * ctx.world, T, g, rows=rows)
        return {"input_ids": x, "targets": y}

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch.get("loss_mask"))
        return loss, {}

    # Held-out bpb through the one function (eval/bpb.py heldout) at the model's context, on a
    # fixed evenly spaced subset of eval_batches x batch_size windows (eval_batches <= 0: all):
    # the whole val split (~219k tokens, ~12 s for a 4x256 model in bf16 on 2 cores) every 100
    # steps would cost ~1/3 of a 10-minute cpu pretraining; `llmforge eval` and the bench score
    # all of it. Also bpb per data source, and (pretrain.eval_tasks_per_task > 0) few-shot
    # verified accuracy on held-out task items, so ability is watched as the loss falls.
    doc_sources = bpb.val_sources(val_data, tok.eot_id)
    eval_tasks = tc.eval_tasks_per_task

    def eval_fn(model):
        started = time.perf_counter()
        out = bpb.heldout(model, val_data, token_bytes, mc.max_seq_len,
                          max_tokens=tc.eval_batches * B * ctx.world * mc.max_seq_len, eot_id=tok.eot_id,
                          doc_sources=doc_sources, batch_size=B)
        if eval_tasks > 0:  # every rank runs the same items, so the loop's mean over ranks is a no-op
            names = task_names(cfg.tasks.names)
            acc = task_eval.evaluate(model, tok, names, eval_tasks, shots=2, max_tokens=cfg.tasks.max_new_tokens,
                                     seed=tc.seed)
            out.update({f"fewshot_acc_{name}": acc[name]["accuracy"] for name in names})
            out["fewshot_acc_mean"] = acc["mean"]["accuracy"]
        out["eval_s"] = round(time.perf_counter() - started, 2)
        return out

    def sample_fn(model):
        from llmforge.infer.engine import Engine
        from llmforge.infer.sampling import SamplingParams
        out = Engine(model, tok, max_batch=1).generate(
            [[tok.eot_id] + tok.encode("def ")], SamplingParams(max_tokens=48, temperature=0.8, seed=0,
                                                                stop_token_ids=[tok.eot_id]))
        return "def " + out[0].text

    ckpt = Checkpointing(run.ckpt("base"), "base", mc, tok, {"preset": cfg.preset})
    try:
        summary = train(model, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                        eval_fn=eval_fn, sample_fn=sample_fn, resume=resume, show_progress=show_progress)
    finally:
        distributed.teardown()
    return summary
