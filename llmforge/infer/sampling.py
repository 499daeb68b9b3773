"""Sampling parameters and logits processing, as tensor ops over the whole batch.

A decode step hands its rows' logits (N, V) to `sample_batch`, which applies, in this order and
each row with its own parameters:
  1. logit bias            logits[t] += bias[t]                      (OpenAI `logit_bias`)
  2. repetition penalty    a logit of a token already generated: divided by r if > 0, else
                           multiplied by r                           (Keskar et al. 2019, CTRL)
  3. presence / frequency  logits[t] -= presence * [count[t] > 0] + frequency * count[t]  (OpenAI)
  4. constraint            tokens the row's grammar forbids -> -inf  (infer/constrain.py)
     (the reported logprobs are log-softmax of the logits at this point)
  5. greedy rows (temperature 0 or top_p 0) take the argmax; the others are divided by their
     temperature, cut to their top-k and to the smallest set with mass >= top_p, and draw
     by inverse CDF: the first token (in vocabulary order) whose cumulative probability exceeds
     u * total, with u the row's own uniform draw (so a request's tokens do not depend on what
     else is in the batch).
Steps 1-4 run only when some row uses them; an all-greedy batch is one argmax and one
log-softmax. `sample_token` is the per-row reference the batched path must equal
(tests/test_sampling.py checks each parameter).
"""
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
    presence_penalty: float = 0.0     # subtracted once from every token already generated
    frequency_penalty: float = 0.0    # subtracted per time a token was generated
    repetition_penalty: float = 1.0   # > 1 makes generated tokens less likely (CTRL's rule)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit

    @property
    def greedy(self) -> bool:   # OpenAI treats top_p 0 as greedy too
        return self.temperature <= 0 or self.top_p <= 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


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


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int],
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-4 of the module docstring for one row (V,): the per-row reference."""
    logits = logits.clone()
    for t, b in params.logit_bias.items():
        logits[t] += b
    if params.penalized and generated:
        count = torch.bincount(torch.tensor(generated), minlength=logits.numel()).to(logits.dtype)
        seen = count > 0
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        logits = logits - params.presence_penalty * seen - params.frequency_penalty * count
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    """Draw one token id from a row of (adjusted) logits (V,) in fp32 with the uniform draw u."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise ValueError("the sampling distribution is empty or not finite (check temperature/top_p/constraint)")
    cdf = torch.cumsum(probs, dim=-1)
    return min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]), right=True)), logits.numel() - 1)


# ---------------------------------------------------------------- the batched path

def adjust_batch(logits: torch.Tensor, params: list[SamplingParams], generated: list[list[int]],
                 allowed: list[torch.Tensor | None]) -> torch.Tensor:
    """Steps 1-4 for a batch (N, V), each row with its own parameters (no-ops are skipped)."""
    N, V = logits.shape
    if any(p.logit_bias for p in params):
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        cols = [t for p in params for t in p.logit_bias]
        vals = [b for p in params for b in p.logit_bias.values()]
        logits = logits.index_put((torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals), accumulate=True)
    pen = [i for i, p in enumerate(params) if p.penalized and generated[i]]
    if pen:
        toks = [torch.tensor(generated[i]) for i in pen]
        row_of = torch.cat([torch.full((len(t),), j) for j, t in enumerate(toks)])
        count = torch.zeros(len(pen), V).index_put_((row_of, torch.cat(toks)), torch.ones(len(row_of)), accumulate=True)
        seen = count > 0
        r = torch.tensor([params[i].repetition_penalty for i in pen])[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in pen])[:, None]
        freq = torch.tensor([params[i].frequency_penalty for i in pen])[:, None]
        sub = logits[pen]
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
        logits = logits.clone()
        logits[pen] = sub - pres * seen - freq * count
    masked = [i for i, a in enumerate(allowed) if a is not None]
    if masked:
        logits = logits.clone() if not pen else logits
        logits[masked] = logits[masked].masked_fill(~torch.stack([allowed[i] for i in masked]), float("-inf"))
    return logits


def filter_batch(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """filter_logits for every row (N, V) at once: top_k (N,) (0 = off), top_p (N,) (1 = off)."""
    N, V = logits.shape
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    cut = sorted_logits < kth   # ties with the k-th value stay, as topk + "< kth" does per row
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    drop |= cut
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities (N, V) after temperature, top-k and top-p for rows that sample (none greedy)."""
    temp = torch.tensor([p.temperature for p in params])[:, None]
    scaled = logits / temp
    if any(p.top_k or p.top_p < 1.0 for p in params):
        scaled = filter_batch(scaled, torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params]))
    return torch.softmax(scaled, dim=-1)


def draw(probs: torch.Tensor, u: list[float]) -> tuple[list[int], list[bool]]:
    """Inverse-CDF draws, one per row of probs (N, V), and whether each row's distribution was valid."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    ok = (torch.isfinite(probs).all(dim=-1) & (total[:, 0] > 0)).tolist()
    idx = torch.searchsorted(cdf, torch.tensor(u, dtype=cdf.dtype)[:, None] * total, right=True)
    return idx[:, 0].clamp(max=probs.shape[1] - 1).tolist(), ok


EMPTY = "the sampling distribution is empty or not finite (check temperature/top_p/constraint)"


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], u: list[float]) -> tuple[list[int], list[str | None]]:
    """Step 5 for every row of adjusted logits (N, V): greedy rows argmax, the rest draw with
    their uniform u. Returns the tokens and, per row, None or the error that ends it alone."""
    tokens = logits.argmax(dim=-1).tolist()
    errors: list[str | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        drawn, ok = draw(distribution(logits[rows], [params[i] for i in rows]), [u[i] for i in rows])
        for i, t, good in zip(rows, drawn, ok):
            tokens[i] = t
            errors[i] = None if good else EMPTY
    return tokens, errors
