"""The optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the
learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from llmforge.config import TrainConfig

# Newton-Schulz quintic coefficients (Jordan et al. 2024, "Muon"): chosen so that five iterations
# push every singular value of a normalised matrix into roughly [0.7, 1.2], fast rather than exact
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T, by the quintic Newton-Schulz iteration
    X <- a X + (b A + c A^2) X with A = X X^T, started from X = G / ||G||_F. `g` is one matrix
    (m, n) or a batch of them (N, m, n), each orthogonalized on its own."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: A is min(m, n) squared
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if tall else x


def _orthogonalized_update(m: DTensor, steps: int) -> DTensor:
    """orthogonalize(m) for an FSDP-sharded matrix (a DTensor holding this rank's rows): Newton-Schulz
    needs the whole matrix, so it is all-gathered, every rank orthogonalizes the same full matrix
    (the compute is repeated, not split) and keeps its own rows of the result."""
    u = orthogonalize(m.full_tensor(), steps)
    return distribute_tensor(u, m.device_mesh, m.placements, src_data_rank=None)  # local rows, no traffic


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True`, AdamW for the others, in one optimizer (one state_dict).

    Muon (MomentUm Orthogonalized by Newton-Schulz; Jordan et al. 2024): keep a Nesterov momentum
    of the gradient, replace it by its nearest semi-orthogonal matrix, and step along that,
    scaled by sqrt(max(1, rows / cols)) so every matrix shape moves its outputs equally:

        m <- mu m + (1 - mu) g;   u <- orth((1 - mu) g + mu m);   W <- W (1 - lr wd) - lr sqrt(max(1, r/c)) u

    It is for the hidden 2-D weights only; embeddings, the output head, norms and biases use AdamW
    (Loshchilov & Hutter 2019) with bias-corrected moments and decoupled weight decay. Under FSDP
    the momentum stays sharded and only the orthogonalization sees whole matrices."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float = 0.95,
                 ns_steps: int = 5, eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, ns_steps=ns_steps, eps=eps,
                                      weight_decay=0.0, muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["muon"]:
                self._muon_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                b1, b2 = group["betas"]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    def _muon_step(self, group: dict) -> None:
        """The Muon update of a group's matrices; same-shape matrices (a layer stack's projections,
        a mixture's experts) are orthogonalized together as one batch: Newton-Schulz on many small
        matrices is a few tiny matmuls each, so one batched pass saves most of the per-call cost."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)
            m = p.grad.lerp(buf, mu)
            if isinstance(m, DTensor):   # sharded: gathered and orthogonalized alone
                self._apply(p, _orthogonalized_update(m, group["ns_steps"]), lr, wd)
            else:
                by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append((p, m))
        for pairs in by_shape.values():
            updates = orthogonalize(torch.stack([m for _, m in pairs]), group["ns_steps"])
            for (p, _), u in zip(pairs, updates):
                self._apply(p, u, lr, wd)

    @staticmethod
    def _apply(p: torch.Tensor, u: torch.Tensor, lr: float, wd: float) -> None:
        p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def hidden_matrices(model: torch.nn.Module) -> set[int]:
    """ids of the 2-D weights inside the transformer blocks (what Muon is for): not the token
    embedding, the output head (tied or not) or a scalar/value head."""
    return {id(p) for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and ".layers." in f".{name}"}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """Weight decay on matrices only; norms, biases and scalar heads' biases are not decayed.
    cfg.optimizer = "muon" moves the hidden matrices to Muon at peak lr cfg.muon_lr. A model with an
    `lr_scales` dict {id(param): scale} trains those parameters at the schedule's lr times the scale
    (the vision stage: the language model slower than the fresh image tower)."""
    params = [p for p in model.parameters() if p.requires_grad]
    scales = getattr(model, "lr_scales", None) or {}
    if cfg.optimizer == "muon":
        hidden = hidden_matrices(model)
        groups = [{"params": [p for p in params if id(p) in hidden], "weight_decay": cfg.weight_decay,
                   "muon": True, "lr_scale": cfg.muon_lr / cfg.lr},
                  {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if id(p) not in hidden and p.dim() < 2], "weight_decay": 0.0}]
        return Muon(_by_scale(groups, scales), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda"  # the fused CUDA kernel; CPU uses the foreach path
    return torch.optim.AdamW(_by_scale(groups, scales), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _by_scale(groups: list[dict], scales: dict[int, float]) -> list[dict]:
    """The non-empty groups, each split by its parameters' lr scale (1 unless `scales` names them)."""
    out = []
    for g in groups:
        split: dict[float, list] = {}
        for p in g["params"]:
            split.setdefault(scales.get(id(p), 1.0), []).append(p)
        for scale, params in split.items():
            out.append({**g, "params": params, **({"lr_scale": g.get("lr_scale", 1.0) * scale} if scale != 1.0 else {})})
    return out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for this step; a group with an `lr_scale` (Muon's) runs at lr * lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


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
