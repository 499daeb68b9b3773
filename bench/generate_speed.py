"""Generation tokens/s at batch 1 and batch 8: the engine's KV cache against full recompute.

    python bench/generate_speed.py runs/cpu                    # a checkpoint or run directory
    python bench/generate_speed.py --random cpu                # random weights, the cpu preset's size
    python bench/generate_speed.py --random micro --new-tokens 100 --batches 1,8

Both methods decode greedily from the same prompts on the same model:
  cache      llmforge.infer.engine.Engine: one prefill, then one token per row per step,
             attending to the stored keys/values;
  recompute  no cache: every step re-runs the whole sequence so far and keeps the last
             position's logits (what a model without a KV cache must do).
tokens/s = generated tokens / wall time (prefill included). The script also checks that
both produce the same tokens. Prompts are random non-special token ids of --prompt-len.
"""
from __future__ import annotations

import argparse
import time

import torch

from llmforge.config import resolve
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.model.transformer import Transformer
from llmforge.tokenizer.bpe import SPECIAL_TOKENS


class NoText:
    """Stands in for a tokenizer with random weights: the engine only needs decode() (for
    the completion text) and token_id() (special tokens, optional)."""

    def decode(self, ids) -> str:
        return ""

    def token_id(self, name: str) -> int:
        raise KeyError(name)


def load(args):
    if args.random:
        cfg = resolve(args.random)
        torch.manual_seed(0)
        return Transformer(cfg.model).eval(), NoText(), f"random {args.random}"
    from llmforge.train.checkpoint import load_model, load_tokenizer
    model, _, folder = load_model(args.model)
    return model.eval(), load_tokenizer(folder), str(folder)


def with_cache(model, tok, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = Engine(model, tok, max_batch=len(prompts))
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return [o.tokens for o in outs]


@torch.no_grad()
def full_recompute(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    seq = torch.tensor(prompts)  # equal lengths: no padding needed
    for _ in range(new_tokens):
        next_ids = model(seq)[:, -1].float().argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_ids], dim=1)
    return seq[:, len(prompts[0]):].tolist()


def timed(fn, *args, repeats: int):
    """Best of `repeats` wall times (the least disturbed by other processes) and the result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="checkpoint folder or run directory")
    ap.add_argument("--random", metavar="PRESET", help="random weights of this preset's model instead")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=0, help="default: fill the context")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if (args.model is None) == (args.random is None):
        ap.error("give a checkpoint path or --random PRESET (one of them)")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, name = load(args)
    ctx = model.cfg.max_seq_len
    new_tokens = args.new_tokens or ctx - args.prompt_len
    if args.prompt_len + new_tokens > ctx:
        ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + new_tokens} exceeds the context {ctx}")
    print(f"model: {name}, {model.num_params() / 1e6:.2f}M parameters, context {ctx}; "
          f"prompt {args.prompt_len} tokens, {new_tokens} new tokens per row, greedy, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    g = torch.Generator().manual_seed(0)
    first = len(SPECIAL_TOKENS)
    with_cache(model, tok, [[first] * 4], 4)  # one-time kernel set-up outside the timings
    print(f"\n{'batch':>5} {'cache tok/s':>12} {'recompute tok/s':>16} {'speed-up':>9}  same tokens")
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(first, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        t_cache, cached = timed(with_cache, model, tok, prompts, new_tokens, repeats=args.repeats)
        t_full, recomputed = timed(full_recompute, model, prompts, new_tokens, repeats=args.repeats)
        generated = batch * new_tokens
        same = "yes" if cached == recomputed else \
            f"{sum(a == b for a, b in zip(cached, recomputed))}/{batch} rows"
        print(f"{batch:>5} {generated / t_cache:12.1f} {generated / t_full:16.1f} {t_full / t_cache:8.2f}x  {same}")


if __name__ == "__main__":
    main()
