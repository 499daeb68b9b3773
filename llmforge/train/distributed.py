"""torchrun integration: one process per device, NCCL on GPUs, gloo on CPUs.

    torchrun --standalone --nproc_per_node=2 -m llmforge.cli pretrain --out runs/ddp
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
