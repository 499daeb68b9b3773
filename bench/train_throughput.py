"""Training throughput and MFU against this machine's own matmul peak, measured in one run.

    python bench/train_throughput.py [--preset cpu] [--steps 8] [--sizes]

Prints the dense-matmul peak (fp32 and bf16) and, for the preset's model and batch, training
tokens/s and MFU = tokens/s * FLOPs/token / peak in each dtype. --sizes also sweeps a few
model shapes (how the cpu preset was chosen).
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


def train_speed(model_cfg, tc, dtype, steps):
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt = build_optimizer(model, tc, "cpu")
    x = torch.randint(0, model_cfg.vocab_size, (tc.batch_size, tc.seq_len))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps pay one-time kernel setup
            times.append(time.perf_counter() - t0)
    times.sort()
    tok_s = tc.batch_size * tc.seq_len / times[len(times) // 2]
    return model, tok_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sizes", action="store_true")
    args = ap.parse_args()
    cfg = resolve(args.preset)
    peaks = {"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16)}
    print(f"matmul peak 2048^2: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    shapes = [(cfg.model, cfg.pretrain)]
    if args.sizes:
        for d, L, H, kv in [(256, 4, 4, 2), (256, 6, 4, 2), (320, 6, 5, 5), (384, 4, 6, 2), (384, 6, 6, 2), (512, 4, 8, 2)]:
            shapes.append((dataclasses.replace(cfg.model, d_model=d, n_layer=L, n_head=H, n_kv_head=kv), cfg.pretrain))
    print(f"{'model':<28} {'params':>8} {'dtype':>5} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>6}")
    for mc, tc in shapes:
        for dtype in ("fp32", "bf16"):
            model, tok_s = train_speed(mc, tc, dtype, args.steps)
            flops = tok_s * model.flops_per_token(tc.seq_len)
            name = f"d{mc.d_model} L{mc.n_layer} H{mc.n_head}/{mc.n_kv_head} B{tc.batch_size}xT{tc.seq_len}"
            print(f"{name:<28} {model.num_params() / 1e6:7.2f}M {dtype:>5} {tok_s:8.0f} {flops / 1e9:8.0f} "
                  f"{flops / peaks[dtype]:6.1%}")


if __name__ == "__main__":
    main()
