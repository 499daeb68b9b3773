"""Training throughput and MFU against this machine's own matmul peak, measured in one run.

    python bench/train_throughput.py [--preset cpu] [--steps 8] [--sizes] [--compile]

Prints the dense-matmul peak (fp32 and bf16) and, for the preset's model and batch, training
tokens/s and MFU = tokens/s * FLOPs/token / peak in each dtype. --sizes also sweeps a few
model shapes (how the cpu preset was chosen); --compile also times each under torch.compile
(inductor), side by side with eager, and the seconds its first step spends compiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from llmforge.config import resolve
from llmforge.model.transformer import Transformer
from llmforge.train.optim import build_optimizer


def peak(dtype, n=2048, seconds=1.5):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def train_speed(model_cfg, tc, dtype, steps, compile: bool = False):
    """(model, median tokens/s, seconds of the first step) for `steps` timed optimizer steps."""
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt = build_optimizer(model, tc, "cpu")
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, model_cfg.vocab_size, (tc.batch_size, tc.seq_len))
    times, first = [], 0.0
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = forward(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            first = time.perf_counter() - t0
        if i >= 2:  # the first steps pay one-time kernel setup (and compilation)
            times.append(time.perf_counter() - t0)
    times.sort()
    tok_s = tc.batch_size * tc.seq_len / times[len(times) // 2]
    return model, tok_s, first


def mfu(flops: float, peak_flops: float) -> str:
    # a dtype the CPU only emulates measures a peak near 0, and an MFU against it means nothing
    return f"{flops / peak_flops:.1%}" if peak_flops > 1e9 else "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile beside eager")
    args = ap.parse_args()
    cfg = resolve(args.preset)
    peaks = {"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16)}
    print(f"matmul peak 2048^2: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    shapes = [(cfg.model, cfg.pretrain)]
    if args.sizes:
        for d, L, H, kv in [(256, 4, 4, 2), (256, 6, 4, 2), (320, 6, 5, 5), (384, 4, 6, 2), (384, 6, 6, 2), (512, 4, 8, 2)]:
            shapes.append((dataclasses.replace(cfg.model, d_model=d, n_layer=L, n_head=H, n_kv_head=kv), cfg.pretrain))
    print(f"{'model':<28} {'params':>8} {'dtype':>5} {'mode':>7} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>6} "
          f"{'vs eager':>8} {'1st step':>8}")
    for mc, tc in shapes:
        for dtype in ("fp32", "bf16"):
            eager = None
            for mode in ("eager", "compile") if args.compile else ("eager",):
                model, tok_s, first = train_speed(mc, tc, dtype, args.steps, compile=mode == "compile")
                eager = eager or tok_s
                flops = tok_s * model.flops_per_token(tc.seq_len)
                name = f"d{mc.d_model} L{mc.n_layer} H{mc.n_head}/{mc.n_kv_head} B{tc.batch_size}xT{tc.seq_len}"
                print(f"{name:<28} {model.num_params() / 1e6:7.2f}M {dtype:>5} {mode:>7} {tok_s:8.0f} "
                      f"{flops / 1e9:8.0f} {mfu(flops, peaks[dtype]):>6s} {tok_s / eager:8.2f} {first:7.1f}s")


if __name__ == "__main__":
    main()
