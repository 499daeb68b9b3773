"""torchrun integration: one process per device, NCCL on GPUs, gloo on CPUs; and the two ways the
one loop spreads a model over them (train.parallel), composed around the unchanged model:

    ddp   every rank holds the whole model, gradients and optimizer state; gradients all-reduced
    fsdp  FSDP2 (`fully_shard`): each block and the root (embeddings, final norm, head) is one
          group whose parameters, gradients and optimizer state live on the ranks in 1/world
          slices (dim-0 DTensor shards); a group is all-gathered just before its forward and
          backward and freed after, and gradients are reduce-scattered

    torchrun --standalone --nproc_per_node=2 -m llmforge.cli pretrain --out runs/ddp
    torchrun --standalone --nproc_per_node=2 -m llmforge.cli pretrain --out runs/fsdp --set pretrain.parallel=fsdp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m llmforge.cli pretrain --out /shared/runs/big --set pretrain.parallel=fsdp   # on every node
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from llmforge.model.transformer import Block


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup() -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    device = pick_device()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistContext(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # torch 2.13 + gloo aborts at exit if a rank leaves before the others
        dist.destroy_process_group()


def all_reduce_mean(value: float | list[float], ctx: DistContext) -> float | list[float]:
    """The mean over ranks of a number, or elementwise of a list (e.g. an MoE layer's expert load)."""
    if not ctx.enabled:
        return value
    values = value if isinstance(value, list) else [value]
    t = torch.tensor(values, dtype=torch.float64 if ctx.device.type == "cpu" else torch.float32, device=ctx.device)
    dist.all_reduce(t)
    mean = [v / ctx.world for v in t.tolist()]
    return mean if isinstance(value, list) else mean[0]


# ---------------------------------------------------------------- FSDP2 and activation checkpointing

def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a policy, a scalar-head model or a vision LM (the unit of sharding
    and of recomputation)."""
    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per block: a block's forward keeps only its input; backward runs the
    forward again to get the rest (non-reentrant torch.utils.checkpoint, so it composes with FSDP's
    hooks and with parameters that do not need gradients). Parameter names do not change."""
    for block in blocks_of(model):
        if not isinstance(block.forward, functools.partial):  # a stage that trains one model twice
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _reshard_plan(model: torch.nn.Module) -> dict[torch.nn.Module, bool]:
    """Which FSDP groups free their gathered parameters after forward: every block but the last
    (backward needs the last one at once); the root keeps its own (embeddings, head) until backward."""
    blocks = blocks_of(model)
    return {**{b: i < len(blocks) - 1 for i, b in enumerate(blocks)}, model: False}


def apply_fsdp(model: torch.nn.Module, mesh, mp_policy) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on every block, then on the root, over a 1-D device mesh.
    Frozen parameters (a LoRA base) are sharded like the rest; they just get no gradients."""
    from torch.distributed.fsdp import fully_shard
    for module, reshard in _reshard_plan(model).items():   # blocks first, the root last
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    return model


def fsdp_setup(model: torch.nn.Module, ctx: DistContext, amp: torch.dtype | None) -> torch.nn.Module:
    """apply_fsdp over all ranks. With bf16 training, parameters are gathered and computed in bf16
    and gradients reduced in fp32 (the sharded master weights and optimizer state stay fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh(ctx.device.type, (ctx.world,), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    return apply_fsdp(model, mesh, policy)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def skip_grad_sync(model: torch.nn.Module):
    """Accumulate this micro-batch's gradients locally (no all-reduce / reduce-scatter)."""
    if not is_sharded(model):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside the block an FSDP model holds its full parameters on every rank and does no
    collectives, so code that calls methods other than forward (the engine's hidden_states) or runs
    on one rank only (sampling) works; it costs one whole copy of the parameters per rank while
    it lasts. Every rank must enter it. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    plan = _reshard_plan(model)
    for module in plan:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module, reshard in plan.items():
            module.set_reshard_after_forward(reshard, recurse=False)
        # reshard everything and forget the forwards run inside: FSDP orders its backward
        # prefetches by the forwards it saw, which must be the same on every rank
        model.reset_iter_state()
