"""A decoder-only transformer of the Llama family.

RMSNorm (pre-norm), rotary position embeddings in the Hugging Face "rotate-half" layout,
grouped-query attention through F.scaled_dot_product_attention, a SwiGLU MLP (or, in the layers
model.moe_every picks, a mixture of SwiGLU experts: model/moe.py), no biases (except optional
Qwen2-style q/k/v biases), optional tied input/output embeddings.

Generation uses a KV cache whose rows are independent "slots": every row has its own
positions, so requests of different lengths share one batch without left padding
(a key at cache position j is visible to a query at position p iff j <= p).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.config import ModelConfig
from llmforge.model.kv_cache import KVCache
from llmforge.model.moe import MoE, SwiGLU, moe_layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, in fp32 for stability under bf16 autocast, as Llama
        # does; PyTorch's one op is bit-identical on CPU (forward and backward) to the five it
        # replaces, and a decode step runs nine of these per token
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # HF layout: the two halves share frequencies
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over cached k, v (B, KV, S, D), each group of H / KV
    query heads sharing one key/value head, without repeating the keys per query head (what
    SDPA's enable_gqa does on CPU); mask (B, 1, T, S) True = may attend, None = all visible."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, KV, H // KV * T, D), k.transpose(-1, -2)) * D ** -0.5
    if mask is not None:   # rows are (group member, query position): the mask broadcasts over members
        scores = scores.view(B, KV, H // KV, T, S).masked_fill(~mask[:, :, None], float("-inf")).view(B, KV, -1, S)
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        if layer < cfg.smear_layers:
            self.smear = nn.Parameter(torch.zeros(cfg.n_kv_head))  # logit of each head's weight on its own key

    def forward(self, x, cos, sin, cache: KVCache | None, plan):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_head != self.n_kv_head
        if cache is None:
            if hasattr(self, "smear"):
                k = smear_keys(k, self.smear)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:   # write into the cache in place, attend to its first plan.span positions
            k, v = cache.update(self.layer, k, v, plan)
            if hasattr(self, "smear"):  # the cache holds raw keys, so every pass smears the visible span
                k = smear_keys(k, self.smear)
            y = grouped_attention(q, k.to(q.dtype), v.to(q.dtype), plan.mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def smear_keys(k: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """Smeared keys (Olsson et al. 2022, "In-context learning and induction heads", sec. 4):
    k'_j = a k_j + (1 - a) k_{j-1} with a = sigmoid(logit) per head and k'_0 = k_0. A key then
    also says which token came before it, so a single layer can attend to "the position after the
    last occurrence of this token" -- an induction head without a previous-token head below it."""
    a = torch.sigmoid(logit).to(k.dtype)[None, :, None, None]
    prev = torch.cat([k[:, :, :1], k[:, :, :-1]], dim=2)
    return a * k + (1 - a) * prev


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, cache, plan):
        x = x + self.attn(self.input_norm(x), cos, sin, cache, plan)
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)
        (or zero with cfg.zero_init_residual, as modded-nanogpt does: every block starts as the identity)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("attn.smear"):
                nn.init.zeros_(p)  # sigmoid(0): half its own key, half the previous one
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                if self.cfg.zero_init_residual:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------ accounting
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight plus attention scores (PaLM, App. B). In an
        MoE layer only the experts a token goes through count (the router's matmul does), plus 6 per
        gated output element for scaling and combining the experts' outputs."""
        T = seq_len or self.cfg.max_seq_len
        matmul_params = self.active_params() - (0 if self.cfg.tie_embeddings else self.embed.weight.numel())
        attn = 12 * self.cfg.n_layer * self.cfg.n_head * self.cfg.head_dim * T
        combine = sum(6 * m.active_experts() * self.cfg.d_model for _, m in moe_layers(self))
        return 6 * matmul_params + attn + combine

    def active_params(self) -> float:
        """Parameters one token's forward uses: all, less the routed experts it skips (on average)."""
        skipped = 0
        for _, m in moe_layers(self):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            skipped += (m.n_experts - m.active_experts()) * per_expert
        return self.num_params() - skipped

    # ------------------------------------------------------------ forward
    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                      embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d). With a cache, `positions` (B, T) are the absolute
        positions of `idx` in each row and `slots` (B,) the cache rows they belong to. `embeds`
        (B, T, d), when given, are the input embeddings instead of embed(idx) (model/vision.py
        puts image patches there)."""
        B, T = idx.shape
        plan = None
        if positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(T, device=idx.device).expand(B, T)
            cos, sin = self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
        else:
            if cache is not None:   # the cache's bookkeeping for this pass, shared by every layer
                plan = cache.plan(positions, slots)
                positions = plan.positions
            positions = positions.to(idx.device)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        x = self.embed(idx) if embeds is None else embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, plan)
        return self.norm(x)

    def forward(self, idx, targets=None, cache=None, positions=None, slots=None, loss_mask=None):
        """Logits (B, T, V); with `targets`, returns (logits, mean cross-entropy over the unmasked
        tokens). With a `loss_mask`, on the CPU, the head runs only where the mask is non-zero and
        the logits returned are those rows, (N, V): the head and its softmax are ~30% of a small
        model's FLOPs, and SFT trains ~60% of its positions (measured 17% off a cpu-model
        forward + backward). On a GPU, and under torch.compile, the dense path runs: the
        selection's data-dependent shape would cost a host sync per step there, or break the graph."""
        hidden = self.hidden_states(idx, cache, positions, slots)
        if (targets is not None and loss_mask is not None and hidden.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            keep = loss_mask.flatten() != 0
            logits = self.lm_head(hidden.flatten(0, 1)[keep])
            return logits, token_cross_entropy(logits, targets.flatten()[keep], loss_mask.flatten()[keep],
                                               normalizer=loss_mask.sum())
        logits = self.lm_head(hidden)
        if targets is None:
            return logits
        return logits, token_cross_entropy(logits, targets, loss_mask)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask=None,
                        normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), weighted by loss_mask and
    divided by its sum (or by `normalizer`, when the rows given are a selection of a batch)."""
    losses = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.flatten().float()
    total = mask.sum() if normalizer is None else normalizer.float()
    return (losses * mask).sum() / total.clamp(min=1.0)
