"""Greedy decode tokens/s against peers, in one run on the same weights: llmforge's engine,
transformers `generate` and llama.cpp, at batch 1 and 8, plus the memory-bandwidth bound.

    python bench/generate_vs_peers.py                          # runs/cpu (its latest policy checkpoint)
    python bench/generate_vs_peers.py runs/cpu/ckpt/sft --new-tokens 200 --batches 1,8

Every runtime decodes greedily (argmax) `--new-tokens` tokens per row from the same random
`--prompt-len`-token prompts (non-special ids), fp32 weights and fp32 KV cache, no stop tokens:
  llmforge      llmforge.infer.engine.Engine (as bench/generate_speed.py drives it);
  transformers  AutoModelForCausalLM.generate(do_sample=False) on llmforge.interop.hf.export_hf's folder;
  llama.cpp     the C API of the CPU library in the `llama-cpp-cffi` wheel, on the f32 GGUF export:
                one prefill of all rows, then one llama_decode of one token per row per step
                (skipped, with the reason, where that library does not load);
  bound         batch x (measured bandwidth of a large fp32 matrix-vector product / the model's
                fp32 weight bytes): what reading every weight once per decode step allows.
tokens/s = generated tokens / wall time (prefill and per-run set-up included), best of --repeats.
Greedy tokens are compared row by row with llmforge's (agree / k of B rows agree).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import load, timed, with_cache  # noqa: E402  (the engine's driver, shared)

from llmforge.tokenizer.bpe import SPECIAL_TOKENS  # noqa: E402


# ---------------------------------------------------------------- transformers

def load_transformers(ckpt_folder: Path, out: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from llmforge.interop.hf import export_hf
    hf_logging.disable_progress_bar()
    hf_dir = export_hf(ckpt_folder, out / "hf", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None   # no early stop: every row decodes --new-tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=0, do_sample=False, num_beams=1)
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return out[:, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- llama.cpp

class LlamaCpp:
    """llama.cpp's CPU library (llmforge/interop/llama_cpp.py loads it); raises RuntimeError with a
    one-line reason where it cannot load."""

    def __init__(self, shim_dir: Path):
        from llmforge.interop.llama_cpp import load_library
        self.ffi, self.lib = load_library(shim_dir)
        self.model = None

    def load(self, path: Path) -> None:
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if self.model == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))

    def _argmax(self, ctx, i: int) -> int:
        row = self.lib.llama_get_logits_ith(ctx, i)
        assert row != self.ffi.NULL
        return int(np.frombuffer(self.ffi.buffer(row, 4 * self.n_vocab), dtype=np.float32).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int, seq_len: int, threads: int) -> list[list[int]]:
        """Greedy, all rows together: one prefill, then one token per row per llama_decode."""
        lib, B, P = self.lib, len(prompts), len(prompts[0])
        cp = lib.llama_context_default_params()
        cp.n_ctx = B * seq_len            # each sequence gets seq_len positions of its own
        cp.n_batch = cp.n_ubatch = max(B * P, 512)
        cp.n_seq_max = B
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = 0         # GGML_TYPE_F32: the KV cache in fp32, as ours
        ctx = lib.llama_init_from_model(self.model, cp)
        if ctx == self.ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")
        batch = lib.llama_batch_init(B * P, 0, 1)
        outs: list[list[int]] = [[] for _ in range(B)]
        try:
            n = 0
            for s, prompt in enumerate(prompts):
                for p, t in enumerate(prompt):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = t, p, 1, p == P - 1
                    batch.seq_id[n][0] = s
                    n += 1
            batch.n_tokens = n
            assert lib.llama_decode(ctx, batch) == 0
            nxt = [self._argmax(ctx, s * P + P - 1) for s in range(B)]
            for step in range(new_tokens):
                for s in range(B):
                    outs[s].append(nxt[s])
                if step == new_tokens - 1:
                    break
                for s in range(B):
                    batch.token[s], batch.pos[s], batch.n_seq_id[s], batch.logits[s] = nxt[s], P + step, 1, True
                    batch.seq_id[s][0] = s
                batch.n_tokens = B
                assert lib.llama_decode(ctx, batch) == 0
                nxt = [self._argmax(ctx, s) for s in range(B)]
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        return outs


# ---------------------------------------------------------------- bound

def matvec_bandwidth(n: int = 8192, repeats: int = 10) -> float:
    """Bytes/s of y = W x with W (n, n) fp32 (256 MiB at n = 8192, far beyond the caches)."""
    w, x = torch.randn(n, n), torch.randn(n)
    y = torch.empty(n)
    torch.mv(w, x, out=y)
    best = min(timed(torch.mv, w, x, repeats=1)[0] for _ in range(repeats))
    return w.numel() * w.element_size() / best


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, theirs))
    return "agree" if same == len(ours) else f"disagree ({same}/{len(ours)} rows agree)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="runs/cpu", help="checkpoint folder or run directory")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (default: torch's choice)")
    args = ap.parse_args()
    args.random = None   # generate_speed.load's switch: this bench always runs a checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model, tok, folder = load(args)
    ctx = model.cfg.max_seq_len
    if args.prompt_len + args.new_tokens > ctx:
        ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the context {ctx}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {folder}, {model.num_params() / 1e6:.2f}M parameters ({weight_bytes / 1e6:.1f} MB fp32), "
          f"context {ctx}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, greedy, "
          f"{threads} threads, best of {args.repeats}")

    tmp = Path(tempfile.mkdtemp(prefix="generate_vs_peers."))
    hf_model = load_transformers(Path(folder), tmp)
    try:
        from llmforge.interop.gguf_export import export_gguf
        llama = LlamaCpp(tmp)
        llama.load(export_gguf(folder, tmp / "model-f32.gguf", dtype="f32"))
    except Exception as e:   # a missing wheel, a library that does not load, no gguf package
        llama = None
        print(f"llama.cpp: skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    bandwidth = matvec_bandwidth()
    print(f"memory bandwidth (fp32 8192x8192 matrix-vector product): {bandwidth / 1e9:.1f} GB/s; "
          f"batch-1 bound {bandwidth / weight_bytes:.0f} tok/s"
          + (f" (note: {weight_bytes / 2**20:.1f} MiB of weights fit in a 32 MiB L3; the DRAM bound is not "
             f"a hard ceiling here)" if weight_bytes < 32 * 2**20 else ""))

    first = len(SPECIAL_TOKENS)
    warm = [[first] * 4]   # one-time kernel set-up outside the timings
    with_cache(model, tok, warm, 4)
    hf_generate(hf_model, warm, 4)
    if llama is not None:
        llama.generate(warm, 4, ctx, threads)

    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(first, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        generated = batch * args.new_tokens
        t_ours, ours = timed(with_cache, model, tok, prompts, args.new_tokens, repeats=args.repeats)
        t_hf, theirs = timed(hf_generate, hf_model, prompts, args.new_tokens, repeats=args.repeats)
        bound = batch * bandwidth / weight_bytes
        hf_rate = generated / t_hf
        result = {"llmforge": (generated / t_ours, "(reference)"),
                  "transformers": (hf_rate, agreement(ours, theirs))}
        if llama is not None:
            t_ll, ll = timed(llama.generate, prompts, args.new_tokens, ctx, threads, repeats=args.repeats)
            result["llama.cpp"] = (generated / t_ll, agreement(ours, ll))
        for name, (rate, same) in result.items():
            rows.append((batch, name, rate, rate / hf_rate, rate / bound, same))
        rows.append((batch, "bound", bound, bound / hf_rate, 1.0, ""))

    print(f"\n{'batch':>5}  {'runtime':<13} {'tok/s':>9} {'vs transformers':>16} {'vs bound':>9}  "
          f"greedy tokens vs llmforge")
    for batch, name, rate, vs_hf, vs_bound, same in rows:
        print(f"{batch:>5}  {name:<13} {rate:9.1f} {vs_hf:15.2f}x {vs_bound:8.0%}  {same}")


if __name__ == "__main__":
    main()
