"""The engine's decode step under torch.compile (opt-in: `Engine(..., compile=True)`).

    engine = Engine(model, tok, max_batch=8, compile=True)    # llmforge generate ... --compile

A decode step of a small model is hundreds of tiny kernels; Inductor fuses the norms, rotary
embedding, cache writes and activations into a few C++ loops, and `cpp_wrapper` calls them from
C++ rather than Python. For that the step needs shapes that do not change every token, so it
uses the cache's static plan (KVCache.static_plan): every row attends to all max_len positions
under the causal mask, and rows are selected by index. Shapes then depend only on the batch
size: the first step compiles (about 20 s here), and once more when the batch size first changes
(dynamo then marks that dimension dynamic). Prefill stays eager;
with speculative decoding the drafts are padded to the full depth so T stays fixed too.
"""
from __future__ import annotations

import torch


class _StaticCache:
    """The engine's cache, planned without host reads (so the traced step has no graph break)."""

    def __init__(self, cache):
        self.cache = cache

    def plan(self, positions, slots):
        return self.cache.static_plan(positions, slots)

    def update(self, layer, k, v, plan):
        return self.cache.update(layer, k, v, plan)


def compiled_decode(model, cache):
    """A function (idx (B, T), positions (B, T), slots (B,)) -> logits (B, T, V), writing the
    step's keys/values into `cache` in place; compiled on first use per (B, T). The engine always
    feeds T = 1 + its speculation depth (drafts padded), so a batch size compiles once."""
    static = _StaticCache(cache)

    def step(idx, positions, slots):
        return model.lm_head(model.hidden_states(idx, cache=static, positions=positions, slots=slots))

    options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
    # the batch dimension becomes dynamic after the first size change (one more compile, not one per size)
    return torch.compile(step, options=options)
