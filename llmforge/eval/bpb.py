"""Bits per byte: the tokenizer-independent measure of a language model's compression.

bpb = (sum over tokens of -log2 p(token)) / (UTF-8 bytes those tokens decode to). Special
tokens (e.g. <|eot|>) decode to no bytes and are left out of both sums, so models with
different vocabularies compare fairly, and against gzip/xz on the same bytes.

`heldout()` is THE held-out number: the pretraining loop's eval, `llmforge eval`, the report
and bench/quality_bpb.py all call it, so one checkpoint has one bpb. What it scores:

- the validation split as one token stream, exactly as the shards hold it (every document
  followed by <|eot|>), with one <|eot|> put in front so the first document starts after an
  <|eot|> as every document does in training;
- cut into non-overlapping windows of `seq_len` targets (the stated context length; callers
  pass the model's context, `model.cfg.max_seq_len`); every target is scored once, the last
  window is shorter rather than dropped;
- a window's first tokens see little context (position k sees k earlier tokens, T/2 on
  average). That is kept on purpose: it is what a model with a bounded context does on a
  long file, it matches how training windows start at random offsets, and a sliding window
  would cost seq_len/stride times more forward passes. Compare bpb only at the same seq_len,
  which is why every result carries it;
- `max_tokens` (optional) scores a fixed, evenly spaced subset of the full windows instead
  of all of them: the same windows on every call, spread over the whole split (the split is
  ordered source by source, so a prefix would only see the first source). The pretraining
  loop uses it (`pretrain.eval_batches` batches of windows) to stay within ~5% of training
  time; final numbers (eval stage, bench, report) use the whole split. `val_tokens` and
  `val_bytes` in the result say which, so two numbers can be reconciled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmforge.errors import UserError

DOCS = "docs.jsonl"   # data/prepare.py's cleaned documents (split, source, text per line)


def token_bytes(tok, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each id decodes to (0 for specials), padded with 0 to the model's vocab."""
    sizes = tok.token_bytes()
    return torch.tensor(sizes + [0] * max(0, (vocab_size or len(sizes)) - len(sizes)), dtype=torch.long)


def val_documents(data_dir) -> list[dict] | None:
    """The validation documents in the order the val shards hold them: [{"source", "text"}].
    None when the run has no data/docs.jsonl (e.g. shards copied without it)."""
    path = Path(data_dir) / DOCS
    if not path.is_file():
        return None
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if '"split": "val"' not in line[:1000]:   # skip train lines without parsing their text
                continue
            doc = json.loads(line)
            if doc["split"] == "val" and doc.get("copies", 1) > 0:  # val documents appear once
                docs.append({"source": doc["source"], "text": doc["text"]})
    return docs


def val_sources(val, eot_id: int) -> list[str] | None:
    """The data source of every document in the val shards `val` (TokenShards), in stream
    order, for heldout(doc_sources=...); None when data/docs.jsonl is missing or does not
    match the shards (then there are no per-source numbers)."""
    docs = val_documents(val.dir)
    if docs is None or len(docs) != sum(int(np.count_nonzero(np.asarray(s) == eot_id)) for s in val.shards):
        return None
    return [d["source"] for d in docs]


class _Stream:
    """<|eot|> followed by the val shards, as one virtual array (nothing is concatenated)."""

    def __init__(self, val, eot_id: int):
        self.shards = [s for s in val.shards if len(s)]
        self.eot = eot_id
        self.ends = np.cumsum([len(s) for s in self.shards]) if self.shards else np.zeros(0, dtype=np.int64)
        self.n_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return self.n_tokens + 1

    def read(self, start: int, end: int) -> np.ndarray:
        """Stream positions [start, end) as int64 (position 0 is the leading <|eot|>)."""
        parts = []
        if start == 0:
            parts.append(np.array([self.eot], dtype=np.int64))
            start = 1
        lo, hi = start - 1, end - 1            # token indices into the shards
        first = int(np.searchsorted(self.ends, lo, side="right"))
        for k in range(first, len(self.shards)):
            begin = int(self.ends[k - 1]) if k else 0
            if begin >= hi:
                break
            parts.append(np.asarray(self.shards[k][max(lo - begin, 0):hi - begin], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def eot_positions(self) -> np.ndarray:
        """Token indices (not stream positions) of every <|eot|> in the shards."""
        out, begin = [], 0
        for s in self.shards:
            out.append(np.flatnonzero(np.asarray(s) == self.eot) + begin)
            begin += len(s)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def windows(n_targets: int, seq_len: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """(start, length) of the scored windows over a stream with n_targets targets: window
    (s, n) has inputs stream[s:s+n] and targets stream[s+1:s+n+1]. All of them (the last one
    shorter), or with max_tokens a fixed evenly spaced subset of the full ones."""
    full = n_targets // seq_len
    spans = [(i * seq_len, seq_len) for i in range(full)]
    if max_tokens is None or max_tokens <= 0 or max_tokens >= n_targets:
        if full * seq_len < n_targets:
            spans.append((full * seq_len, n_targets - full * seq_len))
        return spans
    if full == 0:
        return [(0, min(n_targets, max_tokens))]
    k = max(1, min(full, max_tokens // seq_len))
    picks = sorted({int(i) for i in np.floor((np.arange(k) + 0.5) * full / k)})
    return [spans[i] for i in picks]


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def heldout(model, val, token_bytes: torch.Tensor, seq_len: int, max_tokens: int | None = None, *,
            eot_id: int | None = None, doc_sources: list[str] | None = None,
            batch_size: int = 16) -> dict:
    """Held-out loss and bits per byte of `model` on the validation split `val` (TokenShards).

    Returns {"val_loss": nats per target (<|eot|> targets included), "val_bpb": bits per byte,
    "val_tokens": targets scored, "val_bytes": bytes they decode to, "val_seq_len": the context
    length} (prefixed, as the loop logs them beside its own "tokens" trained),
    plus "val_bpb_<source>" for each data source when `doc_sources` (the source of every val
    document, in stream order: see val_documents) is given. See the module docstring for
    what is scored. Under torch.distributed each rank scores every world-th window and the
    sums are all-reduced, so every rank returns the same numbers.
    """
    context = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if seq_len <= 0 or (context is not None and seq_len > context):
        raise UserError(f"bits per byte at context {seq_len}: give a length between 1 and the model's "
                        f"context {context}")
    if eot_id is None:
        from llmforge.data.shards import read_manifest
        eot_id = read_manifest(val.dir).get("eot_id")
    stream = _Stream(val, eot_id if eot_id is not None else -1)
    if eot_id is None:   # every document ends with <|eot|>, so the stream's last token is it
        stream.eot = int(stream.read(len(stream) - 1, len(stream))[0])
    if stream.n_tokens == 0:
        raise UserError(f"the '{val.split}' split in {val.dir} has no tokens; raise data.val_fraction and "
                        "re-run `llmforge data prepare`")
    spans = windows(len(stream) - 1, seq_len, max_tokens)
    rank, world = _distributed()
    spans = spans[rank::world]

    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    names = sorted(set(doc_sources)) if doc_sources is not None else []
    if doc_sources is not None:
        eots = stream.eot_positions()
        if len(eots) != len(doc_sources):
            raise ValueError(f"the val shards hold {len(eots)} documents but {len(doc_sources)} sources were "
                             "given; they must come from the same `llmforge data prepare`")
        source_of_doc = torch.tensor([names.index(s) for s in doc_sources], dtype=torch.long)
    # float64 sums: loss (all targets), targets, nats on byte-bearing targets, bytes; then per source
    sums = torch.zeros(4 + 2 * len(names), dtype=torch.float64)

    def score(rows: list[tuple[int, int]]) -> None:
        n = rows[0][1]
        data = torch.from_numpy(np.stack([stream.read(s, s + n + 1) for s, _ in rows]))
        x, y = data[:, :-1].to(device), data[:, 1:].to(device)
        logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
        nbytes = token_bytes[y.flatten()]
        nats = losses * (nbytes > 0)
        part = [losses.sum(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                nats.sum(), nbytes.sum().double()]
        if names:
            # the target at stream position p is token p-1; its document = number of <|eot|> before it
            idx = torch.cat([torch.arange(s, s + n) for s, _ in rows])   # token indices of the targets
            doc = torch.from_numpy(np.searchsorted(eots, idx.numpy(), side="left"))
            src = source_of_doc[doc.clamp(max=len(doc_sources) - 1)].to(device)
            part += [torch.bincount(src, weights=nats, minlength=len(names)),
                     torch.bincount(src, weights=nbytes.double(), minlength=len(names))]
        sums.add_(torch.cat([p.reshape(-1).double().cpu() for p in part]))

    batch = []
    for span in spans:
        if batch and span[1] != batch[0][1]:   # the shorter last window goes alone
            score(batch)
            batch = []
        batch.append(span)
        if len(batch) == batch_size:
            score(batch)
            batch = []
    if batch:
        score(batch)
    if world > 1:
        import torch.distributed as dist
        total = sums.to(device)
        dist.all_reduce(total)
        sums = total.cpu()
    loss, n_tok, nats, n_bytes = (float(v) for v in sums[:4])
    out = {"val_loss": loss / max(n_tok, 1), "val_bpb": nats / math.log(2) / max(n_bytes, 1),
           "val_tokens": int(n_tok), "val_bytes": int(n_bytes), "val_seq_len": int(seq_len)}
    for i, name in enumerate(names):
        src_nats, src_bytes = float(sums[4 + i]), float(sums[4 + len(names) + i])
        if src_bytes > 0:
            out[f"val_bpb_{name}"] = src_nats / math.log(2) / src_bytes
    return out


def heldout_of_run(model, run, tok) -> dict | None:
    """heldout()'s record for a run's model: the whole validation split at the model's context
    (max_seq_len), fp32, with bpb per source; None when the run has no validation shards (e.g. a
    run built from an imported model). The eval stage and the tests call it."""
    from llmforge.data.shards import TokenShards
    try:
        val = TokenShards(run.data, "val")
        with torch.no_grad():
            return heldout(model, val, token_bytes(tok, model.cfg.vocab_size), model.cfg.max_seq_len,
                           eot_id=tok.eot_id, doc_sources=val_sources(val, tok.eot_id))
    except (UserError, FileNotFoundError):
        return None
