"""The engine's decode step under torch.compile (opt-in: `Engine(..., compile=True)`).

    engine = Engine(model, tok, max_batch=8, compile=True)    # llmforge generate ... --compile

A decode step of a small model is hundreds of tiny kernels; Inductor fuses the norms, rotary
embedding and activations into a few C++ loops, and `cpp_wrapper` calls them from C++ rather
than Python. These choices keep the compiled step fast (bench/generate_vs_peers.py measures it):

- Static shapes, bucketed batches. Every row attends to all max_len cache positions under the
  causal mask (KVCache.static_plan) and feeds T = 1 + the speculation depth tokens, so shapes
  depend only on the batch size, which is padded up to a power of two (1, 2, 4, 8; CUDA-graph
  batch sizes in vLLM work the same way); larger batches run eager (MAX_ROWS, measured). One
  compile per bucket (seconds each, then cached on disk by Inductor), never a dynamic-shape
  graph: measured here, once the batch dimension had gone dynamic, batch 1 decoded at 626
  tok/s against 2,263 for its static graph.
- The cache is read inside the graph and written after it. Writing it inside (index_put_ on a
  buffer the graph also reads) made Inductor copy every slot of the layer's cache each step, a
  cost that grew with max_batch (at batch 8 the compiled step was ~2.5x slower than eager). The
  step instead attends to each row's cached keys with the new ones laid over their positions
  (`_overlay`), returns the new keys/values, and one index_put per tensor stores them for all
  layers (KVCache.write).
- Pad rows of a bucket read slot 0 and are never written or returned.
- On the CPU, Inductor's freezing (weights as constants, prepacked for oneDNN) and cpp_wrapper.
Prefill stays eager. With speculative decoding the drafts are padded to the full depth.
"""
from __future__ import annotations

import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config

from llmforge.model.kv_cache import KVCache


def _overlay(cached: torch.Tensor, new: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """cached (B, H, S, D) with new (B, H, T, D) in place of positions first .. first + T - 1 of
    each row (first (B, 1)), out of place: what the cache will hold once this step is written."""
    B, H, S, D = cached.shape
    offset = torch.arange(S, device=cached.device)[None, :] - first   # (B, S): index into new
    inside = (offset >= 0) & (offset < new.shape[2])
    picked = new.gather(2, offset.clamp(0, new.shape[2] - 1)[:, None, :, None].expand(B, H, S, D))
    return torch.where(inside[:, None, :, None], picked.to(cached.dtype), cached)


class _ReadOnlyCache:
    """The engine's cache as the traced step sees it: planned without host reads (so the graph has
    no break), read with this step's keys/values laid over it, and not written (they are kept in
    `new`, for KVCache.write after the step)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def plan(self, positions, slots):
        return self.cache.static_plan(positions, slots)

    def update(self, layer, k, v, plan):
        self.new.append((k, v))
        first = plan.positions[:, :1]
        return (_overlay(self.cache.k[layer][plan.rows], k, first),
                _overlay(self.cache.v[layer][plan.rows], v, first))


# Decode batches up to this many rows run compiled. Measured with the `cpu` model (engine alone,
# eager = 1): batch 1 1.7-1.8x, 8 1.1-1.2x, 16 0.89x, 32 0.9-1.0x; a server at 32 clients 0.85x.
# Past ~8 rows the static plan's full-context attention over gathered cache rows costs more than
# the fused kernels save.
MAX_ROWS = 8


def bucket(batch: int, max_batch: int) -> int:
    """The compiled batch size that serves `batch` rows: the next power of two, at most max_batch."""
    return min(1 << (batch - 1).bit_length(), max_batch)


class CompiledDecode:
    """`decode(idx (B, T), positions (B, T), slots (B,))` -> logits (B, T, V): one decode step of
    `model` under torch.compile, its keys/values written into `cache` (see the module docstring)."""

    def __init__(self, model, cache: KVCache, max_batch: int):
        self.cache = cache
        self.max_rows = min(max_batch, MAX_ROWS)   # larger decode batches run eager

        def step(idx, positions, slots):
            view = _ReadOnlyCache(cache)
            logits = model.lm_head(model.hidden_states(idx, cache=view, positions=positions, slots=slots))
            return logits, torch.stack([k for k, _ in view.new]), torch.stack([v for _, v in view.new])

        cpu = cache.k.device.type == "cpu"
        self._step = torch.compile(step, options={"cpp_wrapper": True} if cpu else {}, dynamic=False)
        # CPU: freezing makes the weights constants, so Inductor prepacks them for oneDNN (bf16
        # decode of a gpt2-small-sized model: 62% -> 88% of the memory-bandwidth bound; the engine
        # never changes a served model's weights). It is set around each bucket's first call, where
        # the compile happens: as a compile option it did not take effect here. GPU: the defaults.
        self._freeze = cpu
        self._compiled: set[int] = set()
        # every engine's step is one code object to dynamo, whose graphs count against one limit
        # (8 by default: fewer than two engines' buckets)
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        B = idx.shape[0]
        pad = bucket(B, self.max_rows) - B
        if pad:   # pad rows: token 0 at positions 0.., reading slot 0; their outputs are dropped
            idx = torch.cat([idx, idx.new_zeros(pad, idx.shape[1])])
            positions = torch.cat([positions, torch.arange(idx.shape[1], device=idx.device).expand(pad, -1)])
            slots = torch.cat([slots, slots.new_zeros(pad)])
        # contiguous inputs: dynamo guards on strides, so an expanded tensor would compile anew
        args = idx.contiguous(), positions.contiguous(), slots.contiguous()
        if idx.shape[0] in self._compiled:
            logits, k, v = self._step(*args)
        else:
            with inductor_config.patch(freezing=self._freeze):
                logits, k, v = self._step(*args)
            self._compiled.add(idx.shape[0])
        self.cache.write(k[:, :B], v[:, :B], positions[:B], slots[:B])
        return logits[:B]

    def warm(self, depth: int) -> None:
        """Compile every bucket now (a server's start-up) rather than on the first batch of each
        size. Runs on an idle engine: the dummy rows' keys land where no request is."""
        device = self.cache.k.device
        for size in sorted({bucket(b, self.max_rows) for b in range(1, self.max_rows + 1)}):
            positions = torch.arange(1 + depth, device=device).expand(size, -1)
            self(torch.zeros_like(positions), positions, torch.arange(size, device=device))
