"""Prefix caching: the keys/values of a prompt's leading blocks, kept for the next prompt that
starts the same way (a shared system prompt, the ~135-token tool description).

    cache = PrefixCache(max_tokens=8192, block=16)
    n = cache.restore(prompt, kv, slot)   # copies the longest cached block prefix into the slot
    ...prefill prompt[n:] at positions n.. ...
    cache.store(prompt, kv, slot)         # after the prompt's prefill: remember its full blocks

The prompt is cut into blocks of `block` tokens; block i is known by (the entry of block i-1,
its tokens), so a block matches only after the same whole prefix (vLLM's automatic prefix
caching, without paging: blocks are copied into and out of a slot of the engine's one KV cache).
Keys carry their rotary position, and a cached block sits at the same absolute positions in
every prompt that shares it, so the copy is exact. The least recently used blocks go first
when more than `max_tokens` are held; at least one prompt token is always left to compute,
since its logits pick the first new token.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Block:
    id: int
    k: torch.Tensor   # (n_layer, n_kv_head, block, head_dim)
    v: torch.Tensor


class PrefixCache:
    def __init__(self, max_tokens: int, block: int = 16):
        if block < 1 or max_tokens < 0:
            raise ValueError(f"prefix cache: block ({block}) must be >= 1 and max_tokens ({max_tokens}) >= 0")
        self.block = block
        self.max_blocks = max_tokens // block
        self.blocks: OrderedDict[tuple, _Block] = OrderedDict()   # (parent id, tokens) -> block, oldest first
        self.next_id = 1
        self.hit_tokens = 0      # prompt tokens restored instead of computed
        self.lookups = 0

    def _chain(self, prompt: list[int]):
        """(key, block or None) for each full block of the prompt that leaves a token to compute."""
        parent = 0
        for start in range(0, len(prompt) - 1 - self.block + 1, self.block):
            key = (parent, tuple(prompt[start:start + self.block]))
            blk = self.blocks.get(key)
            yield start, key, blk
            if blk is None:
                return
            parent = blk.id

    def restore(self, prompt: list[int], kv, slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into row `slot` of `kv`; return its length."""
        self.lookups += 1
        found = []
        for start, key, blk in self._chain(prompt):
            if blk is None:
                break
            found.append((start, key, blk))
        for start, key, blk in reversed(found):   # deepest first, so a parent stays newer than its children
            self.blocks.move_to_end(key)
            end = start + self.block
            kv.k[:, slot, :, start:end] = blk.k   # every layer at once (the cache is one tensor)
            kv.v[:, slot, :, start:end] = blk.v
        n = len(found) * self.block
        self.hit_tokens += n
        return n

    def store(self, prompt: list[int], kv, slot: int) -> None:
        """Remember the prompt's full blocks, now in row `slot` of `kv`."""
        if not self.max_blocks:
            return
        touched = []
        parent = 0
        for start in range(0, len(prompt) - 1 - self.block + 1, self.block):
            key = (parent, tuple(prompt[start:start + self.block]))
            blk = self.blocks.get(key)
            if blk is None:
                end = start + self.block
                blk = _Block(self.next_id, kv.k[:, slot, :, start:end].clone(), kv.v[:, slot, :, start:end].clone())
                self.next_id += 1
                self.blocks[key] = blk
            touched.append(key)
            parent = blk.id
        for key in reversed(touched):
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block
