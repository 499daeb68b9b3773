"""A preallocated KV cache whose rows ("slots") advance independently.

Each slot holds one sequence; a forward pass writes the new keys/values at each row's own
absolute positions, so sequences of different lengths decode together in one batch.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_slots, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, n_slots: int, max_len: int | None = None, dtype=None) -> "KVCache":
        c = model.cfg
        dtype = dtype or next(model.parameters()).dtype
        device = next(model.parameters()).device
        return cls(c.n_layer, n_slots, c.n_kv_head, max_len or c.max_seq_len, c.head_dim, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor | None):
        """Write k, v (B, H, T, D) at `positions` (B, T) of rows `slots` (B,), and return the
        keys/values those rows can attend to: (B, H, S, D) with S = max position + 1."""
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=k.device) if slots is None else slots
        # advanced indexing puts the (B, T) index dims first: value layout (B, T, H, D)
        r = rows[:, None].expand(B, T)
        self.k[layer][r, :, positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][r, :, positions] = v.transpose(1, 2).to(self.v[layer].dtype)
        span = int(positions.max()) + 1
        if slots is None:
            return self.k[layer][:B, :, :span], self.v[layer][:B, :, :span]
        return self.k[layer][rows, :, :span], self.v[layer][rows, :, :span]
