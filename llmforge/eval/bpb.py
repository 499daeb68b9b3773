"""Bits per byte: the tokenizer-independent measure of a language model's compression.

bpb = (sum over tokens of -log2 p(token)) / (UTF-8 bytes those tokens decode to). Special
tokens (e.g. <|eot|>) decode to no bytes and are left out of both sums, so models with
different vocabularies compare fairly, and against gzip/xz on the same bytes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def evaluate(model, batches, token_bytes: torch.Tensor) -> dict[str, float]:
    """Mean validation loss (nats/token) and bits per byte over `batches` of (x, y)."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    loss_sum, n_tokens, nats, n_bytes = 0.0, 0, 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        loss_sum += float(losses.sum())
        n_tokens += y.numel()
        nbytes = token_bytes[y.flatten()]
        counted = nbytes > 0
        nats += float(losses[counted].sum())
        n_bytes += int(nbytes.sum())
    return {"val_loss": loss_sum / max(n_tokens, 1),
            "val_bpb": nats / math.log(2) / max(n_bytes, 1)}
