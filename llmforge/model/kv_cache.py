"""A preallocated KV cache whose rows ("slots") advance independently, written in place.

Each slot holds one sequence; a forward pass writes the new keys/values at each row's own
absolute positions, so sequences of different lengths decode together in one batch.

Two tensors, keys and values, each (n_layer, n_slots, n_kv_head, max_len, head_dim), are
allocated once; nothing is reallocated while decoding. A forward pass first makes a `Plan`
(`cache.plan(positions, slots)`: the host reads the positions once, not once per layer), and
every layer then writes its keys/values into the cache and attends to a view of it:
  - rows: a slice of the cache when the batch's slots are consecutive (the usual case: one
    request, or a batch admitted together), else an index (the keys are then gathered);
  - writes: a slice copy when every row writes the same positions, else one index_put_;
  - mask: none when no query can see a key past its own position (a decode step in which all
    rows are at the same position), else the per-row causal mask over absolute positions,
    built once per forward and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """What every layer of one forward pass needs to use the cache (see the module docstring)."""
    rows: slice | torch.Tensor        # the batch's cache rows
    write_at: slice | None            # the positions all rows write, when they are the same range
    positions: torch.Tensor           # (B, T) absolute positions, for the general write
    span: int                         # keys visible to this pass: positions 0 .. span - 1
    mask: torch.Tensor | None         # (B, 1, T, span) bool, True = may attend; None = all visible


class KVCache:
    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (n_layer, n_slots, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, n_slots: int, max_len: int | None = None, dtype=None) -> "KVCache":
        c = model.cfg
        p = next(model.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        return cls(c.n_layer, n_slots, c.n_kv_head, max_len or c.max_seq_len, c.head_dim, dtype, p.device)

    def plan(self, positions: torch.Tensor, slots: torch.Tensor | list[int] | None) -> Plan:
        """The pass's bookkeeping from `positions` (B, T) and `slots` (B,) (None = rows 0..B-1).
        The one host read of the pass happens here (free when the engine hands CPU tensors)."""
        B, T = positions.shape
        pos = positions.tolist()
        slot_list = list(range(B)) if slots is None else (slots if isinstance(slots, list) else slots.tolist())
        lo = slot_list[0]
        consecutive = slot_list == list(range(lo, lo + B))
        rows = slice(lo, lo + B) if consecutive else torch.tensor(slot_list, device=self.k.device)
        first = pos[0]
        same = consecutive and first == list(range(first[0], first[0] + T)) and all(p == first for p in pos)
        span = max(max(p) for p in pos) + 1
        device = self.k.device
        positions = positions.to(device)
        mask = None
        if T > 1 or any(p[-1] != span - 1 for p in pos):   # some query must not see some key
            mask = torch.arange(span, device=device)[None, None, None, :] <= positions[:, None, :, None]
        return Plan(rows, slice(first[0], first[0] + T) if same else None, positions, span, mask)

    def static_plan(self, positions: torch.Tensor, slots: torch.Tensor) -> Plan:
        """A plan with no host reads and shapes that depend only on the batch size: every pass
        attends to all max_len positions under the causal mask (for a compiled decode step)."""
        mask = torch.arange(self.max_len, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]
        return Plan(slots, None, positions, self.max_len, mask)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Store every layer's keys/values of one pass at once: k, v (n_layer, B, H, T, D) at
        `positions` (B, T) of the cache rows `slots` (B,), one index_put per tensor."""
        _, B, _, T, _ = k.shape
        rows = slots[:, None].expand(B, T)
        # the two index dims are split by a slice, so they lead the value: (B, T, n_layer, H, D)
        self.k[:, rows, :, positions] = k.permute(1, 3, 0, 2, 4).to(self.k.dtype)
        self.v[:, rows, :, positions] = v.permute(1, 3, 0, 2, 4).to(self.v.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan):
        """Write k, v (B, H, T, D) into the cache in place and return the keys/values the rows
        can attend to, (B, H, span, D): a view of the cache when the rows are a slice."""
        kc, vc = self.k[layer], self.v[layer]
        if plan.write_at is not None:   # one slice copy per tensor
            kc[plan.rows, :, plan.write_at] = k
            vc[plan.rows, :, plan.write_at] = v
        else:
            B, _, T, _ = k.shape
            rows = plan.rows if isinstance(plan.rows, torch.Tensor) else \
                torch.arange(plan.rows.start, plan.rows.stop, device=k.device)
            r = rows[:, None].expand(B, T)
            # advanced indexing puts the (B, T) index dims first: value layout (B, T, H, D)
            kc[r, :, plan.positions] = k.transpose(1, 2).to(kc.dtype)
            vc[r, :, plan.positions] = v.transpose(1, 2).to(vc.dtype)
        return kc[plan.rows, :, :plan.span], vc[plan.rows, :, :plan.span]   # a view for a slice of rows
