"""Greedy decode tokens/s against peers, in one run on the same weights: llmforge's engine (fp32,
compiled, bf16, int8, speculative), transformers `generate` and llama.cpp, at batch 1 and 8, plus
the memory-bandwidth bound; then speculative decoding on code prompts.

    python bench/generate_vs_peers.py                          # runs/cpu (its latest policy checkpoint)
    python bench/generate_vs_peers.py runs/cpu/ckpt/sft --new-tokens 200 --batches 1,8

Every runtime decodes greedily (argmax) `--new-tokens` tokens per row from the same random
`--prompt-len`-token prompts (non-special ids), no stop tokens:
  llmforge      llmforge.infer.engine.Engine, fp32 weights and KV cache; its variants:
    compiled      Engine(compile=True): the decode step under torch.compile (compiled before timing);
    bf16 / int8   llmforge.infer.quantize.for_inference (bf16 weights and cache; int8 weight-only),
                  eager and compiled;
    speculative   Engine(speculate=--speculate): prompt-lookup drafts verified in one pass;
  transformers  AutoModelForCausalLM.generate(do_sample=False) on llmforge.interop.hf.export_hf's folder;
  llama.cpp     the C API of the CPU library in the `llama-cpp-cffi` wheel, on the f32 GGUF export:
                one prefill of all rows, then one llama_decode of one token per row per step
                (skipped, with the reason, where that library does not load);
  bound         batch x (measured bandwidth of a large fp32 matrix-vector product / the weight
                bytes at that precision): what reading every weight once per decode step allows.
tokens/s = generated tokens / wall time (prefill and per-run set-up included), best of --repeats.
Greedy tokens are compared row by row with llmforge fp32's (agree / k of B rows agree); for bf16
and int8 the share of equal tokens is printed instead (their argmax may differ legitimately).
The bandwidth check (--bound-preset, default gpt2-small) decodes random weights of a model big
enough that reading them is the cost (the `cpu` model's 9 MiB sit in the L3 cache and its step
is per-kernel overhead), at batch 1 in each precision, eager and compiled, against the bound.
The prefill section times prompts that fill the context, one new token each, at each precision.
The code section decodes from --code-prompt-len-token windows of the Python standard library's
source (what the `cpu` model was trained on), one window per file for max(--batches) files, in
groups of each batch size (at batch 1 each window alone), with and without speculation: tok/s,
the speed-up and the acceptance rate (accepted / drafted tokens).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import load, timed  # noqa: E402  (the engine's driver, shared)

from llmforge.infer import quantize  # noqa: E402
from llmforge.infer.engine import Engine  # noqa: E402
from llmforge.infer.quantize import for_inference  # noqa: E402
from llmforge.infer.sampling import SamplingParams  # noqa: E402
from llmforge.tokenizer.bpe import SPECIAL_TOKENS  # noqa: E402


def engine_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return [o.tokens for o in outs]


def weight_bytes_of(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the rotary tables, a tied head once,
    and not an input embedding the head does not share (a lookup reads one row of it)."""
    head = {t.data_ptr() for t in model.lm_head.state_dict().values() if t is not None}
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or "rope" in name or t.data_ptr() in seen or (name.endswith("embed.weight")
                                                                    and t.data_ptr() not in head):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def token_share(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    return f"{same / sum(map(len, ours)):.0%} of tokens equal"


def code_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens from the standard library's own source, one file each."""
    import importlib
    import inspect
    names = ["json.encoder", "json.decoder", "textwrap", "argparse", "dataclasses", "functools", "heapq", "string"]
    out = []
    for i in range(n):
        ids = tok.encode(inspect.getsource(importlib.import_module(names[i % len(names)])))
        start = len(ids) // 3
        out.append(ids[start:start + length])
    return out


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
    ap.add_argument("--speculate", type=int, default=4, help="draft tokens per step of the speculative row")
    ap.add_argument("--code-prompt-len", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled engines (saves ~2 min)")
    ap.add_argument("--bound-preset", default="gpt2-small",
                    help="the bandwidth check's model shape (random weights; '' = skip the check)")
    ap.add_argument("--bound-tokens", type=int, default=32, help="the bandwidth check's new tokens")
    args = ap.parse_args()
    args.random = None   # generate_speed.load's switch: this bench always runs a checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model, tok, folder = load(args)
    ctx = model.cfg.max_seq_len
    if args.prompt_len + args.new_tokens > ctx:
        ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the context {ctx}")
    weight_bytes = weight_bytes_of(model)
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

    batches = [int(b) for b in args.batches.split(",")]
    top = max(batches)
    bf16, int8 = for_inference(copy.deepcopy(model), "bf16"), for_inference(copy.deepcopy(model), "int8")
    variants = {"llmforge": (model, {}), "llmforge compiled": (model, {"compile": True}),
                "llmforge bf16": (bf16, {}), "llmforge bf16 compiled": (bf16, {"compile": True}),
                "llmforge int8": (int8, {}), "llmforge int8 compiled": (int8, {"compile": True}),
                f"llmforge spec{args.speculate}": (model, {"speculate": args.speculate})}
    if args.no_compile:
        variants = {name: v for name, v in variants.items() if not v[1].get("compile")}
    engines = {name: Engine(m, tok, max_batch=top, **kw) for name, (m, kw) in variants.items()}
    bytes_of = {name: weight_bytes_of(m) for name, (m, _) in variants.items()}

    first = len(SPECIAL_TOKENS)
    warm = [[first] * 4]   # one-time kernel set-up (and compilation) outside the timings
    for name, engine in engines.items():
        for b in batches:
            engine_generate(engine, warm * b, 4)
    hf_generate(hf_model, warm, 4)
    if llama is not None:
        llama.generate(warm, 4, ctx, threads)

    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        prompts = torch.randint(first, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        generated = batch * args.new_tokens
        result, ours = {}, None
        for name, engine in engines.items():
            t, toks = timed(engine_generate, engine, prompts, args.new_tokens, repeats=args.repeats)
            if ours is None:
                ours, same = toks, "(reference)"
            else:
                same = agreement(ours, toks) if "bf16" not in name and "int8" not in name else token_share(ours, toks)
            result[name] = (generated / t, same, batch * bandwidth / bytes_of[name])
        t_hf, theirs = timed(hf_generate, hf_model, prompts, args.new_tokens, repeats=args.repeats)
        hf_rate = generated / t_hf
        bound = batch * bandwidth / weight_bytes
        result["transformers"] = (hf_rate, agreement(ours, theirs), bound)
        if llama is not None:
            t_ll, ll = timed(llama.generate, prompts, args.new_tokens, ctx, threads, repeats=args.repeats)
            result["llama.cpp"] = (generated / t_ll, agreement(ours, ll), bound)
        for name, (rate, same, own_bound) in result.items():
            rows.append((batch, name, rate, rate / hf_rate, rate / own_bound, same))
        rows.append((batch, "bound fp32", bound, bound / hf_rate, 1.0, ""))
        bf16_bound = result["llmforge bf16"][2]
        rows.append((batch, "bound bf16", bf16_bound, bf16_bound / hf_rate, 1.0, ""))

    print(f"\n{'batch':>5}  {'runtime':<18} {'tok/s':>9} {'vs transformers':>16} {'vs bound':>9}  "
          f"greedy tokens vs llmforge fp32   (vs bound: the bound at the runtime's own weight precision)")
    for batch, name, rate, vs_hf, vs_bound, same in rows:
        print(f"{batch:>5}  {name:<18} {rate:9.1f} {vs_hf:15.2f}x {vs_bound:8.0%}  {same}")

    # ---------------------------------------------------------------- speculation on code
    spec = engines[f"llmforge spec{args.speculate}"]
    plain = engines["llmforge"]
    new = min(args.new_tokens, ctx - args.code_prompt_len)
    print(f"\nspeculative decoding on code: {top} {args.code_prompt_len}-token windows of stdlib source, {new} new tokens, "
          f"up to {args.speculate} drafted tokens per step (prompt lookup), greedy")
    print(f"{'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speed-up':>9} {'acceptance':>11}  greedy tokens")
    windows = code_prompts(tok, top, args.code_prompt_len)   # every batch size decodes all `top` windows

    def in_groups(engine, batch):
        return [t for i in range(0, top, batch) for t in engine_generate(engine, windows[i:i + batch], new)]

    for batch in batches:
        t0, base = timed(in_groups, plain, batch, repeats=args.repeats)
        before = (spec.stats.drafted_tokens, spec.stats.accepted_tokens)
        t1, fast = timed(in_groups, spec, batch, repeats=args.repeats)
        drafted, accepted = spec.stats.drafted_tokens - before[0], spec.stats.accepted_tokens - before[1]
        n = top * new
        print(f"{batch:>5} {n / t0:12.1f} {n / t1:11.1f} {t0 / t1:8.2f}x {accepted / max(drafted, 1):10.0%}  "
              f"{agreement(base, fast)}")

    # ---------------------------------------------------------------- prefill
    long = torch.randint(first, model.cfg.vocab_size, (top, ctx - 8), generator=g).tolist()
    print(f"\nprefill: {top} prompts of {ctx - 8} random tokens, one new token each (tok/s = prompt tokens / s)")
    for name in ("llmforge", "llmforge bf16", "llmforge int8", "int8 kernel only"):
        rows, quantize.BATCHED_ROWS = quantize.BATCHED_ROWS, sys.maxsize if name == "int8 kernel only" else \
            quantize.BATCHED_ROWS   # the weight-only kernel at every size: int8 before its bf16 matmul path
        try:
            t, _ = timed(engine_generate, engines["llmforge int8" if "int8" in name else name], long, 1,
                         repeats=args.repeats)
        finally:
            quantize.BATCHED_ROWS = rows
        print(f"{name:<18} {top * (ctx - 8) / t:9.0f}")

    if args.bound_preset:
        bandwidth_check(args.bound_preset, bandwidth, args.bound_tokens, compile=not args.no_compile)


def bandwidth_check(preset: str, bandwidth: float, new_tokens: int, compile: bool) -> None:
    """Batch-1 decode of random weights in `preset`'s shape (large enough that reading the weights,
    not per-step overhead, is the cost) at each precision, against the bound at that precision."""
    from generate_speed import NoText

    from llmforge.config import resolve
    from llmforge.model.transformer import Transformer
    torch.manual_seed(0)
    base = Transformer(resolve(preset).model).eval()
    print(f"\nbandwidth check: random `{preset}` weights ({base.num_params() / 1e6:.0f}M parameters), batch 1, "
          f"16-token prompt, {new_tokens} new tokens, greedy; bound = {bandwidth / 1e9:.1f} GB/s / bytes read per step")
    print(f"{'precision':<10} {'runtime':<10} {'tok/s':>8} {'bound':>8} {'vs bound':>9} {'vs bf16':>8}")
    rows, prompt = [], [[len(SPECIAL_TOKENS)] * 16]
    for dtype in ("fp32", "bf16", "int8"):
        m = for_inference(copy.deepcopy(base), dtype)
        bound = bandwidth / weight_bytes_of(m)
        for compiled in ((False, True) if compile else (False,)):
            engine = Engine(m, NoText(), max_batch=1, compile=compiled)
            engine_generate(engine, prompt, 4)   # compiles outside the timing
            t, _ = timed(engine_generate, engine, prompt, new_tokens, repeats=2)
            rows.append((dtype, "compiled" if compiled else "eager", new_tokens / t, bound))
        del m
    bf16_best = max(r[2] for r in rows if r[0] == "bf16")
    for dtype, runtime, rate, bound in rows:
        print(f"{dtype:<10} {runtime:<10} {rate:8.1f} {bound:8.1f} {rate / bound:8.0%} {rate / bf16_best:7.2f}x")


if __name__ == "__main__":
    main()
