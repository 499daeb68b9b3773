"""The loop on a tiny random-data model in one scenario, for tests/test_fsdp.py: run it in-process
(one rank, the reference) and under torchrun with train.parallel=fsdp, then compare.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT SCENARIO [SCENARIO ...]

Scenarios: muon (Muon on the hidden matrices), lora (rank-4 adapters on a frozen base),
checkpointing (activation checkpointing per block). Each writes OUT/SCENARIO/metrics.jsonl and
its final checkpoint to OUT/SCENARIO/ckpt (whole weights in model.safetensors).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmforge.config import ModelConfig, TrainConfig
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.train import distributed
from llmforge.train.loop import Checkpointing, train

MODEL = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
ROWS = 8   # global batch rows per step, split over the ranks


def config(scenario: str, parallel: str) -> TrainConfig:
    tc = TrainConfig(batch_size=ROWS, seq_len=16, lr=1e-2, warmup_steps=2, max_steps=5, eval_every=0,
                     ckpt_every=0, log_every=1, dtype="fp32", parallel=parallel, grad_accum=2)
    if scenario == "muon":
        tc.optimizer = "muon"
    elif scenario == "lora":
        tc.lora_rank, tc.lora_targets = 4, "q_proj,v_proj,down_proj"
    elif scenario == "checkpointing":
        tc.activation_checkpointing = True
    return tc


def run(out: Path, scenario: str, ctx: distributed.DistContext, parallel: str) -> None:
    tc = config(scenario, parallel)
    tc.batch_size = ROWS // ctx.world
    torch.manual_seed(0)
    model = Transformer(MODEL)
    folder = out / scenario

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(step * 31 + micro)
        x = torch.randint(0, MODEL.vocab_size, (ROWS, tc.seq_len + 1), generator=g)
        rows = slice(ctx.rank * tc.batch_size, (ctx.rank + 1) * tc.batch_size)
        return {"input_ids": x[rows, :-1], "targets": x[rows, 1:]}

    def loss_fn(model, batch):
        return model(batch["input_ids"], targets=batch["targets"])[1], {}

    ckpt = Checkpointing(folder / "ckpt", "base", MODEL)
    train(model, tc, RunDir(folder), stage="test", ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
          show_progress=False)


if __name__ == "__main__":
    ctx = distributed.setup()
    try:
        for name in sys.argv[2:]:
            run(Path(sys.argv[1]), name, ctx, "fsdp")
    finally:
        distributed.teardown()
