"""Pretraining: next-token prediction on the packed shards -> ckpt/base.

    llmforge pretrain --out runs/demo [--preset cpu] [--minutes 10] [--resume]
    torchrun --standalone --nproc_per_node=2 -m llmforge.cli pretrain --out runs/demo
"""
from __future__ import annotations

import dataclasses

import torch

from llmforge.config import Config
from llmforge.data.shards import TokenShards, read_manifest
from llmforge.errors import UserError
from llmforge.eval import bpb
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
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
    token_bytes = torch.tensor(tok.token_bytes() + [0] * (mc.vocab_size - tok.vocab_size))
    B, T = tc.batch_size, tc.seq_len
    if ctx.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {train_data.num_tokens:,} train tokens, "
              f"batch {B * tc.grad_accum * ctx.world} x {T}, world {ctx.world}")

    def get_batch(step, micro, ctx):
        # the global batch of this (step, micro) is fixed by the seed; each rank reads its rows
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        x, y = train_data.sample_batch(B * ctx.world, T, g, rows=slice(ctx.rank * B, (ctx.rank + 1) * B))
        return {"input_ids": x, "targets": y}

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"])
        return loss, {}

    def eval_fn(model):
        rows = slice(ctx.rank * B, (ctx.rank + 1) * B)
        return bpb.evaluate(model, val_data.sequential_batches(B * ctx.world, T, tc.eval_batches, rows=rows),
                            token_bytes)

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
