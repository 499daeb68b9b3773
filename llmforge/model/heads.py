"""Scalar heads on top of the transformer: reward (read at the last token) and value (per token)."""
from __future__ import annotations

import torch
import torch.nn as nn

from llmforge.model.transformer import Transformer


class ScalarHeadModel(nn.Module):
    """A transformer trunk with a linear head mapping each hidden state to one number."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.cfg.d_model, 1, bias=True)
        nn.init.normal_(self.head.weight, 0.0, 1.0 / (trunk.cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-token scalars (B, T)."""
        return self.head(self.trunk.hidden_states(idx)).squeeze(-1).float()

    def score_last(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence, read at its last real token (right-padded batches)."""
        values = self(idx)
        return values[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


class PolicyWithValue(nn.Module):
    """A policy transformer plus a scalar value head on its final hidden states (PPO's critic
    sharing the policy's trunk). forward -> (logits (B, T, V), values (B, T)). The head starts at
    zero, so the first value estimates are 0 and the first advantages are the raw returns."""

    def __init__(self, policy: Transformer):
        super().__init__()
        self.policy = policy
        self.cfg = policy.cfg
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor):
        h = self.policy.hidden_states(idx)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()

    def flops_per_token(self, seq_len=None):
        return self.policy.flops_per_token(seq_len)
