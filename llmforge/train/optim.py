"""AdamW with decay/no-decay groups, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch

from llmforge.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms, biases and scalar heads' biases are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"  # the fused CUDA kernel; CPU uses the foreach path
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step `step`, where `progress` in [0, 1] is the share of the
    budget (steps, tokens or minutes, whichever binds) used so far."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":  # warmup-stable-decay (MiniCPM): flat, then linear decay at the end
        start = 1.0 - cfg.decay_fraction
        if progress <= start:
            return cfg.lr
        return cfg.lr + (floor - cfg.lr) * (progress - start) / cfg.decay_fraction
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
