"""Token shards on disk: flat binary files of token ids, plus the memmap loader training reads.

    data/train_000.bin, train_001.bin, ..., val_000.bin   ids as uint16 (vocab < 65536) or uint32,
                                                          every document followed by <|eot|>
    data/manifest.json                                    what is in them (see prepare.py)

A flat file needs no parsing: np.memmap maps it and a training window is one slice. A
shard is written under a temporary name and renamed into place only when complete, so a
file named train_NNN.bin is always whole; the loader also checks each file's size against
the manifest to catch truncation or a mismatched re-run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llmforge.errors import UserError

MANIFEST = "manifest.json"
_FIX = "re-run `llmforge data prepare` for this run"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2 ** 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


class ShardWriter:
    """Append tokenized documents to `split`'s shards; a shard is completed (synced and
    renamed into place) once it holds at least `shard_tokens` tokens, and `on_shard` gets
    its manifest entry. Use as a context manager: an exception discards the open shard.

    `position` passed to add() is the count of documents of the split consumed so far; it
    is stored with each shard so an interrupted run can resume after the last whole shard.
    """

    def __init__(self, data_dir, split: str, dtype, shard_tokens: int, start_index: int = 0,
                 on_shard: Callable[[dict], None] | None = None):
        self.dir = Path(data_dir)
        self.split, self.dtype, self.shard_tokens = split, np.dtype(dtype), shard_tokens
        self.index = start_index
        self.on_shard = on_shard or (lambda entry: None)
        self.shards: list[dict] = []
        self._file = None
        self._tmp: str | None = None

    def __enter__(self) -> "ShardWriter":
        self.dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish()
        else:
            self._discard()

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(prefix=f".{shard_name(self.split, self.index)}.", suffix=".tmp",
                                         dir=self.dir)
        self._file = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self._tokens = self._docs = self._bytes = 0
        self._source_tokens: Counter = Counter()
        self._lang_tokens: Counter = Counter()

    def add(self, ids: np.ndarray, position: int, docs: int = 0, text_bytes: int = 0,
            source_tokens: dict | None = None, lang_tokens: dict | None = None) -> None:
        if self._file is None:
            self._open()
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}")
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self._tokens += len(ids)
        self._docs += docs
        self._bytes += text_bytes
        self._source_tokens.update(source_tokens or {})
        self._lang_tokens.update(lang_tokens or {})
        self._position = position
        if self._tokens >= self.shard_tokens:
            self._finish()

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, self.index)
        os.replace(self._tmp, self.dir / name)
        entry = {"file": name, "tokens": self._tokens, "size": self._tokens * self.dtype.itemsize,
                 "sha256": self._sha.hexdigest(), "docs": self._docs, "text_bytes": self._bytes,
                 "source_tokens": dict(self._source_tokens),
                 "lang_tokens": dict(self._lang_tokens), "next_doc": self._position}
        self._file = self._tmp = None
        self.index += 1
        self.shards.append(entry)
        self.on_shard(entry)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            os.unlink(self._tmp)
            self._file = self._tmp = None


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `llmforge data prepare` for this run first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt; {_FIX}") from None


class TokenShards:
    """Every shard of one split, memory-mapped, read as training windows."""

    def __init__(self, data_dir, split: str):
        self.dir = Path(data_dir)
        manifest = read_manifest(self.dir)
        if split not in manifest.get("splits", {}):
            raise UserError(f"{self.dir / MANIFEST} has no '{split}' split; {_FIX}")
        self.split = split
        self.dtype = np.dtype(manifest["dtype"])
        self.shards: list[np.ndarray] = []
        for entry in manifest["splits"][split]["shards"]:
            path = self.dir / entry["file"]
            if not path.is_file():
                raise UserError(f"shard {path} is missing; {_FIX}")
            expected = entry["tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise UserError(f"shard {path} has {path.stat().st_size} bytes but the manifest says "
                                f"{expected} (truncated or corrupt); {_FIX}")
            if entry["tokens"]:
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(entry["tokens"],)))
        self.num_tokens: int = sum(len(s) for s in self.shards)

    def _starts_per_shard(self, seq_len: int) -> np.ndarray:
        """How many windows of seq_len + 1 tokens (inputs plus the shifted target) fit in each shard."""
        counts = np.array([max(0, len(s) - seq_len) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise UserError(f"the '{self.split}' split ({self.num_tokens} tokens) has no shard longer than "
                            f"seq_len={seq_len}; lower the seq_len or add data")
        return counts

    def _window(self, shard: int, start: int, seq_len: int) -> np.ndarray:
        return np.asarray(self.shards[shard][start:start + seq_len + 1], dtype=np.int64)

    def sample_batch(self, batch_size: int, seq_len: int, generator, rows: slice | None = None):
        """Random windows: a shard chosen in proportion to its size, then a uniform offset.
        All batch_size starts are always drawn, so every DDP rank advances `generator`
        identically and then reads only its own `rows`."""
        counts = self._starts_per_shard(seq_len)
        # One uniform draw over all valid starts = shard weighted by size, then offset in it.
        flat = torch.randint(0, int(counts.sum()), (batch_size,), generator=generator).numpy()
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, flat, side="right")
        offset = flat - (ends[shard] - counts[shard])
        return self._batch(list(zip(shard.tolist(), offset.tolist())), seq_len, rows)

    def sequential_batches(self, batch_size: int, seq_len: int, max_batches: int,
                           rows: slice | None = None) -> Iterator:
        """Non-overlapping windows from the start of the split, in shard order (for
        validation: the same tokens every time). Yields full batches, at most max_batches
        (<= 0: all); a split too small for one full batch yields one partial batch."""
        self._starts_per_shard(seq_len)  # raises if no window fits

        def windows():
            for shard, tokens in enumerate(self.shards):
                for start in range(0, len(tokens) - seq_len, seq_len):
                    yield shard, start

        batch, produced = [], 0
        for shard, start in windows():
            batch.append((shard, start))
            if len(batch) == batch_size:
                yield self._batch(batch, seq_len, rows)
                batch, produced = [], produced + 1
                if 0 < max_batches <= produced:
                    return
        if batch and produced == 0:
            yield self._batch(batch, seq_len, rows)

    def _batch(self, windows: list[tuple[int, int]], seq_len: int, rows: slice | None):
        """(shard, start) windows -> x, y int64 of shape (len(windows[rows]), seq_len)."""
        if rows is not None:
            windows = windows[rows]
        data = np.stack([self._window(s, o, seq_len) for s, o in windows]) if windows \
            else np.zeros((0, seq_len + 1), dtype=np.int64)
        data = torch.from_numpy(data)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()
