"""What every training stage shares: padded token tensors and next-token batches."""
from __future__ import annotations

import torch


def pad(rows: list[list[int]], value: int = 0, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def lm_batch(seqs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """(ids, mask) sequences -> next-token batch {input_ids, targets, loss_mask} of width seq_len."""
    ids = [s[:seq_len + 1] for s, _ in seqs]
    masks = [m[:seq_len + 1] for _, m in seqs]
    width = min(seq_len, max(len(s) for s in ids) - 1)
    x = pad([s[:-1] for s in ids], pad_id, width)
    y = pad([s[1:] for s in ids], pad_id, width)
    m = pad([mk[1:] for mk in masks], 0, width).float()
    return {"input_ids": x, "targets": y, "loss_mask": m}
