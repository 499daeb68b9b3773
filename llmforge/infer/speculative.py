"""Speculative decoding with a prompt-lookup drafter: propose the tokens that followed the last
earlier occurrence of the sequence's final n-gram, check them all in one forward pass.

    engine = Engine(model, tok, speculate=4)   # up to 4 drafted tokens per row per step

Decoding a small model on a CPU is bound by per-step overhead, not arithmetic, so a forward pass
over 1 + k tokens costs about as much as over one: every accepted draft token is a step saved.
Code and chat answers copy a lot from their context (names, arguments, repeated lines), which is
what the drafter guesses (Saxena 2023, "prompt lookup decoding").

`verify` turns the model's logits at the fed positions into the tokens to emit:
  greedy    accept draft tokens while each equals the argmax at its position, then emit the
            argmax at the first mismatch (or after the last draft): exactly greedy decoding;
  sampling  the accept/reject rule of Leviathan et al. 2023 / Chen et al. 2023 with a
            deterministic draft (q = one-hot): accept draft token d with probability p(d), else
            draw from p with d removed, renormalised (max(0, p - q) / its sum); after k accepted
            tokens draw one more from p. Each emitted token is distributed exactly as plain sampling's.
Rows with a grammar constraint or repetition penalties do not speculate (their distribution at a
drafted position depends on the draft itself); the engine gives them no drafter.
"""
from __future__ import annotations

import random

import torch

from llmforge.infer.sampling import EMPTY, SamplingParams, distribution, draw


class PromptLookup:
    """Proposes up to `k` tokens: what followed the latest earlier occurrence of the sequence's
    last n tokens, trying n = max_ngram down to 1. A copy that runs into the end of the sequence
    goes on copying what it just proposed (a run of period p continues with period p). An index
    of n-gram -> end position is kept and extended incrementally as the sequence grows, so a
    proposal costs O(max_ngram), not O(length)."""

    def __init__(self, k: int, max_ngram: int = 3):
        if k < 1 or max_ngram < 1:
            raise ValueError(f"speculate: k ({k}) and max_ngram ({max_ngram}) must be >= 1")
        self.k, self.max_ngram = k, max_ngram
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0   # n-grams ending before this position are in the index

    def propose(self, seq: list[int], room: int | None = None) -> list[int]:
        k = self.k if room is None else min(self.k, room)
        last = len(seq) - 1   # the n-grams ending at the last token are the query, not yet indexed
        for end in range(max(self.indexed, 1), last + 1):
            for n in range(1, self.max_ngram + 1):
                if end - n >= 0:
                    self.index[tuple(seq[end - n:end])] = end
        self.indexed = max(self.indexed, last + 1)
        for n in range(min(self.max_ngram, len(seq)), 0, -1):
            at = self.index.get(tuple(seq[len(seq) - n:]))
            if at is not None:
                draft = seq[at:at + k]
                while len(draft) < k:   # the copy reaches the end: a repeat continues with itself
                    draft.append((seq + draft)[at + len(draft)])
                return draft
        return []


def verify(logits: torch.Tensor, draft: list[int], params: SamplingParams, rng: random.Random) -> list[int]:
    """The tokens to emit from logits (1 + k, V) at the fed positions (the last token, then the k
    draft tokens): the accepted draft prefix, then one token drawn by the model."""
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        out = []
        for d, b in zip(draft, best):
            out.append(b)
            if b != d:
                return out
        return out + [best[len(draft)]]
    probs = distribution(logits, [params] * len(logits))
    if not torch.isfinite(probs).all():
        raise ValueError(EMPTY)
    p_draft = probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)].tolist() if draft else []
    out = []
    for i, (d, pd) in enumerate(zip(draft, p_draft)):
        if rng.random() < pd:   # accept with probability min(1, p(d) / q(d)), q(d) = 1
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0       # max(0, p - q): q is all on d
        tokens, ok = draw(residual[None], [rng.random()])
        if not ok[0]:
            raise ValueError(EMPTY)
        return out + tokens
    tokens, ok = draw(probs[len(draft)][None], [rng.random()])
    if not ok[0]:
        raise ValueError(EMPTY)
    return out + tokens
