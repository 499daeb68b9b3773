"""Memory of the one loop's training step, measured on CPU against `llmforge plan-memory`'s plan.

    python bench/fsdp_memory.py                                 # activation checkpointing off vs on
    torchrun --standalone --nproc_per_node=2 bench/fsdp_memory.py --shard   # ddp vs fsdp per rank

Without --shard (one process): one training step of the same model and batch with activation
checkpointing off and on, its peak memory by kind (PyTorch's MemTracker: parameters, gradients,
optimizer state, activations, temporaries) and its step time (best of --repeats), beside the
planner's numbers. With --shard: each rank's bytes of parameters, gradients and optimizer state
(its own tensors, DTensor shards counted locally) after one step under DDP and under FSDP2,
and their ratio (the target: about 1/world).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from llmforge.config import ModelConfig, TrainConfig
from llmforge.model.transformer import Transformer
from llmforge.train import distributed
from llmforge.train.memory import plan_memory
from llmforge.train.optim import build_optimizer

MIB = 1024 ** 2


def step(model, optimizer, x) -> None:
    _, loss = model(x, targets=x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checkpointing_tradeoff(mc: ModelConfig, tc: TrainConfig, repeats: int) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker
    x = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len), generator=torch.Generator().manual_seed(0))
    rows = {}
    for ac in (False, True):
        torch.manual_seed(0)
        model = Transformer(mc)
        if ac:
            distributed.checkpoint_blocks(model)
        optimizer = build_optimizer(model, tc, "cpu")
        step(model, optimizer, x)               # optimizer state exists, as in every later step
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step(model, optimizer, x)
        peak = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(model, optimizer, x)
            times.append(time.perf_counter() - t0)
        plan = plan_memory(mc, dataclasses.replace(tc, activation_checkpointing=ac), "ddp", 1)
        rows[ac] = (peak, min(times), plan)
        print(f"checkpointing {'on ' if ac else 'off'}: peak {peak['Total'] / MIB:7.1f} MiB (activations "
              f"{peak['ACT'] / MIB:6.1f}, params {peak['PARAM'] / MIB:5.1f}, grads {peak['GRAD'] / MIB:5.1f}, "
              f"optimizer {peak['OPT'] / MIB:5.1f}, temporaries {peak['TEMP'] / MIB:5.1f}); plan: activations "
              f"{plan.activations / MIB:6.1f}, total {plan.total / MIB:7.1f}; step {min(times) * 1e3:6.0f} ms")
    (off, t_off, _), (on, t_on, _) = rows[False], rows[True]
    print(f"checkpointing: peak x{on['Total'] / off['Total']:.2f}, activations x{on['ACT'] / off['ACT']:.2f}, "
          f"step time x{t_on / t_off:.2f}")


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def per_rank_state(mc: ModelConfig, tc: TrainConfig, ctx, parallel: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = Transformer(mc)
    if parallel == "fsdp":
        distributed.fsdp_setup(model, ctx, None)
        trained = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(model)
    optimizer = build_optimizer(model, tc, "cpu")
    x = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len))
    _, loss = trained(x, targets=x)
    loss.backward()
    optimizer.step()
    out = {"params": sum(local_bytes(p) for p in {id(p): p for p in model.parameters()}.values()),
           "grads": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
           "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                            if torch.is_tensor(v) and v.dim())}
    plan = plan_memory(mc, tc, parallel, ctx.world)
    out["planned"] = plan.params + plan.grads + plan.optimizer
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", action="store_true", help="ddp vs fsdp per rank (run under torchrun)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    mc = ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.width // 64, n_kv_head=max(1, args.width // 128),
                     d_model=args.width, max_seq_len=args.seq)
    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq, dtype="fp32")
    shape = f"model {args.layers}x{args.width}, vocab {args.vocab}, micro-batch {args.batch} x {args.seq}, fp32"
    if not args.shard:
        print(shape)
        checkpointing_tradeoff(mc, tc, args.repeats)
        return
    ctx = distributed.setup()
    if ctx.is_main:
        print(shape)
    try:
        ddp, fsdp = (per_rank_state(mc, tc, ctx, p) for p in ("ddp", "fsdp"))
        if ctx.is_main:
            for name in ("params", "grads", "optimizer"):
                print(f"rank 0 {name:<9}  ddp {ddp[name] / MIB:7.2f} MiB   fsdp {fsdp[name] / MIB:7.2f} MiB   "
                      f"ratio {fsdp[name] / ddp[name]:.3f}")
            ours = fsdp["params"] + fsdp["optimizer"]
            theirs = ddp["params"] + ddp["optimizer"]
            print(f"params + optimizer per rank: fsdp/ddp = {ours / theirs:.3f} on {ctx.world} ranks "
                  f"(1/world = {1 / ctx.world:.3f}); planner params+grads+optimizer: ddp "
                  f"{ddp['planned'] / MIB:.2f} MiB (measured {(theirs + ddp['grads']) / MIB:.2f}), fsdp "
                  f"{fsdp['planned'] / MIB:.2f} MiB (measured {(ours + fsdp['grads']) / MIB:.2f})")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
