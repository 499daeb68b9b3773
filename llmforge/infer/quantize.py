"""Inference precision of a loaded policy: fp32, bf16 weights, or int8 weight-only.

    model = for_inference(model, "int8")          # llmforge serve runs/x --dtype int8
    llmforge generate runs/x --prompt "def f(" --dtype bf16

  fp32  the checkpoint as trained.
  bf16  every weight (and so the activations and the KV cache) in bfloat16; RMSNorm still
        normalises in fp32. Half the bytes per decode step; fast where the CPU has bf16
        instructions (AVX512-BF16, AMX) or on a GPU, slower where it has not (AVX2 converts).
  int8  every Linear of the blocks and the output head stored as int8 with one fp32 scale per
        output channel (symmetric, scale = max |w| / 127 over the row), computed by PyTorch's
        weight-only int8 kernel `aten._weight_int8pack_mm` on bf16 activations, or from
        BATCHED_ROWS rows (prefill, big batches) a bf16 matmul on the weight converted to bf16
        and then scaled (the rest of the model, norms, attention and the cache, stays fp32); the input
        embedding stays fp32 (a lookup, not a matmul), so a tied head gets its own int8 copy.
        A quarter of the fp32 bytes of those layers. The kernel's speed depends on the CPU
        build: bench/generate_vs_peers.py measures it beside fp32 and bf16.
The conversion is in place (it returns the same module) and is for inference only: int8
layers have no gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.errors import UserError

DTYPES = ("fp32", "bf16", "int8")
# From this many rows an int8 layer multiplies by its weight converted to bf16 instead of calling the
# weight-only kernel (measured on a 4096 x 192 weight: 264 against 144 us at 32 rows, 1,255 against
# 361 at 150; at 8 rows the kernel wins, 93 against 105)
BATCHED_ROWS = 32


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times a per-row fp32 scale (no bias: the model has none
    except Qwen2-style q/k/v biases, which are kept in fp32 and added)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if rows.shape[0] < BATCHED_ROWS:
            # bf16 activations: on this project's CPU the kernel's bf16 path is 5-20x faster than
            # its fp32 one (a 1 x 768 by 3072 x 768 product: 38 against 762 us) and than fp32 matmul
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale_bf16)
        else:   # prefill and big batches: the kernel's time grows with the rows; a bf16 matmul's does not
            y = F.linear(rows, self.weight_int8.to(torch.bfloat16)) * self.scale_bf16
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def for_inference(model: nn.Module, dtype: str) -> nn.Module:
    """Convert a Transformer in place to the inference precision `dtype` (see the module docstring)."""
    check_dtype(dtype)
    model.eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
        lm = getattr(model, "trunk", model)   # a vision model's language model holds the tables
        for name in ("rope_cos", "rope_sin"):   # rotary tables stay fp32 (bf16 angles drift with position)
            setattr(lm, name, getattr(lm, name).float())
        return model
    if dtype == "int8":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model
