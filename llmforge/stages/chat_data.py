"""The conversations the assistant learns from, and batches that mix them with pretraining text.

Used by midtraining (the end of pretraining: chat rows mixed into text batches, as nanochat's
mid stage does) and by SFT (text rows mixed into chat batches, so the assistant keeps its
corpus: without them SFT doubled held-out bits/byte, 1.85 -> 3.91).

A chat row carries the assistant-only loss mask (tokenizer/chat.py); a text row is a window of
the pretraining shards with every token trained. Batches are a pure function of (seed, step,
micro) so resume is exact and DDP ranks read their own rows of one global batch.
"""
from __future__ import annotations

import math
import random

import torch

from llmforge.errors import UserError
from llmforge.tasks import get_task
from llmforge.tasks.copying import copy_drills
from llmforge.tasks.user_data import load_conversations
from llmforge.tasks.words import spelling_drills
from llmforge.tokenizer.chat import render


def conversations(names: list[str], per_task: int, spelling: int = 0, user_data: str = "",
                  seed: int = 0, offset: int = 0, copying: int = 0) -> list[list[dict]]:
    """Gold conversations of every task's train items, spelling and copy drills and the user's
    JSONL, shuffled. Only the train side of every phrasing/content pool is ever used here."""
    convs = []
    for name in names:
        convs += [item.conversation for item in get_task(name).train_items(per_task, offset=offset)]
    convs += spelling_drills(spelling, seed=seed)
    convs += copy_drills(copying, seed=seed + offset)
    if user_data:
        convs += load_conversations(user_data)
    random.Random(seed).shuffle(convs)
    return convs


def pack(seqs: list[tuple[list[int], list[int]]], width: int, pad_id: int, packing: bool):
    """Rows of exactly `width` tokens (ids, mask). With packing, whole conversations are placed
    greedily one after another in a row (none is split); without, one conversation per row.
    A conversation longer than a row is truncated (its tail is lost, and counted)."""
    rows, cur_ids, cur_mask, truncated = [], [], [], 0
    for ids, mask in seqs:
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
        if cur_ids and (not packing or len(cur_ids) + len(ids) > width):
            rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    masks = torch.zeros((len(rows), width), dtype=torch.float)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        masks[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, masks, truncated


class ChatRows:
    """Conversations rendered and packed into rows of seq_len + 1 tokens with their loss masks."""

    def __init__(self, tok, convs: list[list[dict]], seq_len: int, packing: bool = True):
        seqs = [render(tok, conv) for conv in convs]
        seqs = [s for s in seqs if sum(s[1][1:seq_len + 1]) > 0]   # something to learn inside the window
        if not seqs:
            raise UserError("no conversations with assistant tokens inside the context; "
                            "raise the examples per task or model.max_seq_len")
        self.ids, self.masks, self.truncated = pack(seqs, seq_len + 1, tok.eot_id, packing)
        self.conversations = len(seqs)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trained_tokens(self) -> int:
        return int(self.masks.sum())


def epoch_order(size: int, start: int, n: int, seed: int) -> torch.Tensor:
    """Items start .. start + n of an endless stream over range(size) that visits every item once
    per epoch, each epoch in its own seeded order. A pure function of its arguments, so resume is
    exact; and without replacement, so a stage that draws fewer rows than there are sees each at
    most once (SFT drawing 3,150 of 5,302 rows with replacement saw ~2,375 distinct ones)."""
    idx = torch.arange(start, start + n)
    epochs = idx // size
    out = torch.empty(n, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        here = epochs == epoch
        out[here] = perm[idx[here] % size]
    return out


def text_rows(draws: int, n_rows: int, share: float) -> int:
    """Text rows in the first `draws` batches of n_rows: floor(draws * n_rows * share), so the
    share holds over the run exactly, not rounded per batch (0.15 of 8 rows was 1 row, 12.5%,
    and 0.2 was 2 rows, 25%: the knob moved in steps of 1/8)."""
    return math.floor(draws * n_rows * share + 1e-9)


def mixed_batch(g: torch.Generator, n_rows: int, rows: slice, seq_len: int, chat: ChatRows | None,
                text=None, text_share: float = 0.0, *, draw: int, seed: int) -> dict:
    """Global batch number `draw` of n_rows: the first text_rows(...) are random text windows
    from the `text` shards (every token trained, drawn with `g`), the rest the next chat rows in
    `epoch_order` (assistant tokens trained); this rank keeps `rows` of it. Every rank builds
    the whole batch, so ranks stay in step."""
    share = 1.0 if chat is None else text_share if text is not None else 0.0
    n_text = text_rows(draw + 1, n_rows, share) - text_rows(draw, n_rows, share)
    parts_x, parts_y, parts_m = [], [], []
    if n_text:
        x, y = text.sample_batch(n_text, seq_len, g)
        parts_x.append(x), parts_y.append(y), parts_m.append(torch.ones_like(y, dtype=torch.float))
    if n_rows - n_text:
        chat_before = draw * n_rows - text_rows(draw, n_rows, share)   # chat rows the earlier batches took
        pick = epoch_order(len(chat), chat_before, n_rows - n_text, seed)
        r, m = chat.ids[pick], chat.masks[pick]
        parts_x.append(r[:, :-1]), parts_y.append(r[:, 1:]), parts_m.append(m[:, 1:])
    x, y, m = torch.cat(parts_x)[rows], torch.cat(parts_y)[rows], torch.cat(parts_m)[rows]
    return {"input_ids": x, "targets": y, "loss_mask": m}
