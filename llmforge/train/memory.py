"""How many bytes one rank of the training loop holds, before running it.

    llmforge plan-memory --preset gpt2-small --parallel fsdp --world 8 --gpu-memory 80GiB

Per rank, for the stage's train config (batch_size x seq_len per micro-batch, dtype, optimizer):

    params       fp32 master weights: all of them (ddp) or this rank's dim-0 slice of each (fsdp:
                 ceil(rows / world) rows, the padding FSDP2 adds included)
    grads        the same shapes as the parameters that train (a LoRA base has none); ddp also
                 holds its gradient buckets, a second copy of every gradient ("buffers")
    optimizer    AdamW: two moments per trained element; Muon: one momentum per hidden matrix
                 element, AdamW's two for the rest
    gathered     fsdp only: the full parameters of the groups that are all-gathered at the same
                 time, in the compute dtype: the root (embeddings, final norm, head; kept for the
                 whole step), the block being computed and the next one (prefetched), and one
                 block's unsharded gradients before they are reduce-scattered
    activations  what autograd keeps for backward over one micro-batch, counted exactly by
                 running the model's own forward on the meta device (no memory, no compute) and
                 adding up the tensors it saves; attention is counted as a fused (flash) kernel
                 keeps it, q, k, v, output and log-sum-exp, which is what SDPA runs on CUDA and on
                 CPU (the meta device alone would take the T x T math path); with activation
                 checkpointing a block keeps only its input, and one block's activations come
                 back while its backward runs

The total is a lower bound on the peak: allocator caching, fragmentation, temporaries inside a
kernel and the CUDA context (~0.5-1 GiB) are not counted. bench/memory_plan.py compares it
with the peak measured on CPU.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from llmforge.config import ModelConfig, TrainConfig
from llmforge.errors import UserError
from llmforge.model.transformer import Block, Transformer
from llmforge.train.optim import hidden_matrices

GIB = 1024 ** 3


def parse_bytes(text: str) -> int:
    """'80GiB', '40GB', '512MiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"--gpu-memory '{text}' is not a size; write it like 80GiB, 40GB or 17179869184")
    number, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    return int(number * (1024 if binary else 1000) ** "_KMGT".index(prefix or "_"))


@dataclass
class MemoryPlan:
    params: int
    grads: int
    optimizer: int
    buffers: int          # ddp's gradient buckets
    gathered: int         # fsdp's all-gathered working set
    activations: int      # as configured (with or without checkpointing)
    activations_full: int
    activations_checkpointed: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.gathered + self.activations


def _shard_numel(p: torch.Tensor, world: int) -> int:
    """Elements of one rank's FSDP2 slice: torch.chunk on dim 0, padded to ceil(rows / world)."""
    if p.dim() == 0:
        return 1
    return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0])


class _FusedAttention(torch.autograd.Function):
    """Shapes only (meta device): what a flash attention kernel saves for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("shape counting only")


@contextlib.contextmanager
def _fused_attention():
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **kw: _FusedAttention.apply(q, k, v)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def saved_activation_bytes(model: torch.nn.Module, batch: int, seq_len: int) -> tuple[int, list[int], int]:
    """(bytes saved outside the blocks, bytes saved per block, bytes of one block's input) for one
    training forward of a meta-device `model` on a (batch, seq_len) batch. Tensors are counted
    once per storage; parameters and buffers are not activations."""
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    owner = {"now": None}
    seen: dict[int, int | None] = {}
    sizes: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in weights and key not in seen:
            seen[key], sizes[key] = owner["now"], t.untyped_storage().nbytes()
        return t

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: owner.update(now=i)))
        hooks.append(b.register_forward_hook(lambda m, a, o: owner.update(now=None)))
    idx = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, targets=idx)
    finally:
        for h in hooks:
            h.remove()
    per_block = [sum(sizes[k] for k, o in seen.items() if o == i) for i in range(len(blocks))]
    outside = sum(sizes[k] for k, o in seen.items() if o is None)
    dtype = next(model.parameters()).dtype
    return outside, per_block, batch * seq_len * model.cfg.d_model * dtype.itemsize


def plan_memory(mc: ModelConfig, tc: TrainConfig, parallel: str, world: int,
                compute_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel '{parallel}' is not one of ddp, fsdp")
    if world < 1:
        raise UserError(f"--world must be at least 1, got {world}")
    if mc.moe_experts:
        raise UserError("plan-memory counts dense models only (an MoE forward routes on real data); "
                        "plan the dense model of the same width, or measure with bench/memory_plan.py")
    with torch.device("meta"):
        model = Transformer(mc)
    if tc.lora_rank:
        from llmforge.model.lora import apply_lora
        model = apply_lora(model, tc)
    shards = world if parallel == "fsdp" else 1
    unique = {id(p): p for p in model.parameters()}.values()        # a tied head counts once
    local = {id(p): _shard_numel(p, shards) for p in unique}
    trained = [p for p in unique if p.requires_grad]
    hidden = hidden_matrices(model) if tc.optimizer == "muon" else set()
    params = 4 * sum(local.values())
    grads = 4 * sum(local[id(p)] for p in trained)
    optimizer = 4 * sum(local[id(p)] * (1 if id(p) in hidden else 2) for p in trained)
    buffers = grads if parallel == "ddp" and world > 1 else 0
    gathered = 0
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if parallel == "fsdp" and world > 1:
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in unique if id(p) not in in_blocks)
        block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        block_trained = max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
        gathered = compute_dtype.itemsize * (root + 2 * block) + 4 * block_trained
    model = model.to(compute_dtype)
    outside, per_block, block_input = saved_activation_bytes(model, tc.batch_size, tc.seq_len)
    full = outside + sum(per_block)
    checkpointed = outside + len(per_block) * block_input + max(per_block)
    return MemoryPlan(params, grads, optimizer, buffers, gathered,
                      checkpointed if tc.activation_checkpointing else full, full, checkpointed)


def report(plan: MemoryPlan, gpu_memory: int | None, label: str) -> str:
    rows = [("params", plan.params), ("grads", plan.grads), ("optimizer", plan.optimizer),
            ("ddp buffers", plan.buffers), ("fsdp gathered", plan.gathered),
            ("activations", plan.activations)]
    lines = [label, *(f"  {name:<14} {b / GIB:10.3f} GiB" for name, b in rows),
             f"  {'total':<14} {plan.total / GIB:10.3f} GiB  (lower bound on the peak)",
             f"  activations without checkpointing {plan.activations_full / GIB:.3f} GiB, "
             f"with {plan.activations_checkpointed / GIB:.3f} GiB"]
    if gpu_memory:
        verdict = "fits" if plan.total <= gpu_memory else "does NOT fit"
        lines.append(f"  {verdict} in {gpu_memory / GIB:.1f} GiB per rank "
                     f"({plan.total / gpu_memory:.0%} of it)")
    return "\n".join(lines)
