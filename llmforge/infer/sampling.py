"""Sampling parameters and the per-row logits processing: temperature, top-k, top-p."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)   # stop strings; the text is cut before them
    logprobs: bool = False
    top_logprobs: int = 0
    execute_tools: bool = False   # run <|tool_call|> spans in the engine and feed back the result
    chat: bool = False            # the text is an assistant reply's content: no special tokens, no tool spans


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits (V,) outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False   # top_p = 0 keeps the most likely token (greedy), never an empty set
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token id from a row of logits (V,) in fp32."""
    if params.temperature <= 0 or params.top_p <= 0:   # greedy (OpenAI treats top_p 0 as greedy too)
        return int(torch.argmax(logits))
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise ValueError("the sampling distribution is empty or not finite (check temperature/top_p/constraint)")
    return int(torch.multinomial(probs, 1, generator=generator))
