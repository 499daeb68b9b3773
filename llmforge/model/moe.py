"""Sparse mixture-of-experts MLP: SwiGLU experts, a token-choice or expert-choice router,
optional shared experts, and the router's auxiliary losses.

    llmforge pretrain --preset cpu-moe --out runs/moe          # or --set model.moe_experts=8 ...
    python bench/moe_vs_dense.py runs/cpu22                     # dense vs MoE at equal compute

A layer holds E routed experts (each a SwiGLU MLP of width model.moe_d_ff), a router
W_r (E x d) and optionally one shared SwiGLU MLP every token goes through (S shared experts of
width f are one MLP of width S f: a sum of SwiGLUs is a SwiGLU over the concatenated hidden
units). With p_t = softmax(W_r x_t), N tokens and capacity C = ceil(capacity_factor * k N / E):

  token choice (Switch, GShard, Mixtral): token t goes to its k most probable experts with gates
      g_te = p_te / sum_{e' in top-k(t)} p_te'  (Mixtral's renormalised top-k). While training an
      expert keeps at most C tokens, the earliest in the batch (Switch's rule); a token none of
      whose experts kept it is dropped: its MLP output is 0 (shared experts aside), so the
      block passes it on through the residual. Evaluation and decoding are dropless, so a
      token's output never depends on the rest of the batch (the KV cache stays exact).
  expert choice (Zhou et al. 2022): expert e takes the C tokens with the largest p_te, gate p_te.
      Load is balanced by construction; a token no expert took is dropped. The choice looks at
      the whole batch, future positions included, which an autoregressive decoder cannot do, so
      DECODING (model.eval(): the engine, bpb evaluation) uses token choice with the trained
      router: each token's top-k experts with gates p_te, not renormalised, as an expert took a
      token with gate p_te in training. `batch_routing_at_eval(model)` scores held-out text with
      the training rule instead (bench/moe_vs_dense.py measures the gap).

y_t = sum_e g_te expert_e(x_t) + shared(x_t). Dispatch is sorted: the (token, expert) pairs are
ordered by expert, so each expert runs once on one contiguous slice of gathered rows, and the
outputs are scattered back with one index_add_ (a Python loop over experts, none over tokens).

The auxiliary losses, computed in every training forward and added to the stage's loss by the
training loop (train/loop.py, `router_losses`):
  load balance (Switch eq. 4; GShard): L_aux = E * sum_e f_e P_e, f_e = the share of the N k
      top-k choices that picked e (before capacity), P_e = mean_t p_te. 1 at uniform routing,
      E when every token picks one expert with probability 1. Token choice only: expert choice
      is balanced by construction.
  router z-loss (ST-MoE eq. 5): L_z = mean_t (log sum_e exp(W_r x_t)_e)^2, keeps logits small.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020): the dense MLP and every expert."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------- the router's math (pure functions)

@dataclass
class Routing:
    """The kept (token, expert) pairs sorted by expert: expert e processes the contiguous slice
    tokens[s:s + counts[e]] (s = counts[:e].sum()) with the gates gates[s:s + counts[e]]."""
    tokens: torch.Tensor   # (M,) token index of each kept (token, expert) pair, sorted by expert
    gates: torch.Tensor    # (M,) its gate
    counts: torch.Tensor   # (E,) pairs per expert


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """C = ceil(factor * k N / E), at most N: tokens one expert processes (Switch eq. 3; Zhou eq. 1)."""
    return min(n_tokens, math.ceil(factor * top_k * n_tokens / n_experts))


def dropped_share(r: Routing, n_tokens: int) -> torch.Tensor:
    """The share of the N tokens that no routed expert processed (they ride the residual)."""
    served = torch.zeros(n_tokens, dtype=torch.bool, device=r.tokens.device)
    served[r.tokens] = True
    return 1.0 - served.float().mean()


def token_choice(probs: torch.Tensor, top_k: int, cap: int | None, renormalize: bool = True) -> Routing:
    """Each token's top-k experts; gates renormalised over the k (Mixtral) or the raw p_te.
    `cap` = None: dropless; else an expert keeps its first `cap` pairs in token order."""
    N, E = probs.shape
    top_p, top_e = probs.topk(top_k, dim=-1)                 # (N, k)
    if renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    expert = top_e.flatten()                                 # pairs in token order: t0's k, t1's k, ...
    order = torch.sort(expert, stable=True).indices          # by expert, token order within an expert
    expert, token, gate = expert[order], order // top_k, top_p.flatten()[order]
    counts = torch.bincount(expert, minlength=E)
    if cap is not None and cap < N:
        rank = torch.arange(len(expert), device=probs.device) - (counts.cumsum(0) - counts)[expert]
        keep = rank < cap
        token, gate, counts = token[keep], gate[keep], counts.clamp(max=cap)
    return Routing(token, gate, counts)


def expert_choice(probs: torch.Tensor, cap: int) -> Routing:
    """Expert e takes the `cap` tokens with the largest p_te, gate p_te (Zhou et al. 2022, eq. 2)."""
    gate, token = probs.t().topk(cap, dim=-1)                # (E, cap)
    counts = torch.full((probs.shape[1],), cap, dtype=torch.long, device=probs.device)
    return Routing(token.flatten(), gate.flatten(), counts)


def top_k_load(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """f_e: the share of the N k top-k choices that picked expert e (before any capacity)."""
    N, E = probs.shape
    return torch.bincount(probs.topk(top_k, dim=-1).indices.flatten(), minlength=E).float() / (N * top_k)


def load_balance_loss(probs: torch.Tensor, top_k: int, load: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer eq. 4 (GShard's form for top-k): E * sum_e f_e P_e. f_e carries no
    gradient, so a caller that already has top_k_load(probs) passes it as `load`."""
    E = probs.shape[-1]
    return E * ((top_k_load(probs, top_k) if load is None else load) * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean over tokens of (logsumexp of the router logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of H(p_t) in nats: log E when undecided, 0 when sure."""
    return -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()


# ---------------------------------------------------------------- the layer

@dataclass
class RouterRecord:
    """What one training forward of one MoE layer reports to the training loop."""
    aux: torch.Tensor      # coef-weighted load-balance + z-loss, with grad
    load: torch.Tensor     # (E,) f_e (detached)
    dropped: torch.Tensor  # share of tokens no routed expert processed
    entropy: torch.Tensor  # mean router entropy, nats
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


class MoE(nn.Module):
    """The sparse MLP of one block (see the module docstring). forward(x (B, T, d)) -> (B, T, d)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router_kind, self.capacity_factor = cfg.moe_router, cfg.moe_capacity_factor
        self.aux_coef, self.z_coef = cfg.moe_aux_coef, cfg.moe_z_coef
        self.batch_routing = False   # expert choice in eval mode too (batch_routing_at_eval)
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.expert_dim) for _ in range(cfg.moe_experts))
        self.shared = SwiGLU(cfg.d_model, cfg.moe_shared_experts * cfg.expert_dim) if cfg.moe_shared_experts else None
        self.records: list[RouterRecord] = []   # filled by training forwards, emptied by the loop

    def route(self, probs: torch.Tensor) -> Routing:
        N = probs.shape[0]
        cap = capacity(N, self.n_experts, self.top_k, self.capacity_factor)
        if self.router_kind == "token_choice":   # capacity while training, dropless otherwise
            return token_choice(probs, self.top_k, cap if self.training else None)
        if self.training or self.batch_routing:
            return expert_choice(probs, cap)
        return token_choice(probs, self.top_k, None, renormalize=False)   # the decoding rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)
        r = self.route(probs)
        rows = x[r.tokens]
        outs = [expert(chunk) for expert, chunk in zip(self.experts, rows.split(r.counts.tolist()))]
        y = torch.zeros_like(x).index_add_(0, r.tokens, torch.cat(outs) * r.gates[:, None].to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training and torch.is_grad_enabled():
            self.records.append(self.record(logits, probs, r))
        return y.reshape(shape)

    def record(self, logits, probs, r: Routing) -> RouterRecord:
        zero = logits.new_zeros(())
        load = top_k_load(probs.detach(), self.top_k)
        balance = load_balance_loss(probs, self.top_k, load) if self.router_kind == "token_choice" else zero
        z = router_z_loss(logits) if self.z_coef else zero
        return RouterRecord(self.aux_coef * balance + self.z_coef * z, load,
                            dropped_share(r, len(probs)), router_entropy(probs.detach()), balance.detach(), z.detach())

    def active_experts(self) -> float:
        """Routed experts a token goes through on average while training (k, or capacity_factor k
        for expert choice, whose experts each fill their capacity)."""
        return self.top_k * (self.capacity_factor if self.router_kind == "expert_choice" else 1.0)


# ---------------------------------------------------------------- what the training loop uses

def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block index, layer) of every MoE layer in `model` (any wrapper: LoRA, heads, DDP)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            parts = name.split(".")
            out.append((int(parts[parts.index("layers") + 1]), m))
    return out


def router_losses(layers: list[tuple[int, MoE]]) -> tuple[torch.Tensor, dict]:
    """Sum of the coef-weighted auxiliary losses the layers recorded since the last call, and the
    metrics the loop logs: per layer its expert load (f_e), dropped-token share and router entropy.
    Empties the records (a layer called several times in one micro-step reports their mean)."""
    total, metrics = None, {}
    balance, z = [], []
    for i, layer in layers:
        recs, layer.records = layer.records, []
        if not recs:
            continue
        aux = sum(r.aux for r in recs)
        total = aux if total is None else total + aux
        n = len(recs)
        metrics[f"moe_load_L{i}"] = sum(r.load for r in recs) / n
        metrics[f"moe_dropped_L{i}"] = sum(r.dropped for r in recs) / n
        metrics[f"moe_entropy_L{i}"] = sum(r.entropy for r in recs) / n
        balance += [r.balance_loss for r in recs]
        z += [r.z_loss for r in recs]
    if total is None:
        return torch.zeros(()), {}
    metrics["moe_balance_loss"] = sum(balance) / len(balance)
    metrics["moe_z_loss"] = sum(z) / len(z)
    return total, metrics


@contextlib.contextmanager
def batch_routing_at_eval(model: nn.Module):
    """Within the block, evaluation of an expert-choice model routes as in training (each expert
    picks its tokens over the batch) instead of by the decoding rule."""
    layers = [m for _, m in moe_layers(model)]
    for m in layers:
        m.batch_routing = True
    try:
        yield
    finally:
        for m in layers:
            m.batch_routing = False
