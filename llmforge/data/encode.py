"""Tokenize document chunks, in this process or in a pool of worker processes.

Kept free of torch so spawned workers start in a fraction of a second. Workers use the
"spawn" start method: forking a parent that already runs torch/tokenizers threads can
deadlock. Results come back in submission order and at most `2 * workers` chunks are in
flight, so memory stays bounded however large the corpus (Pool.imap would read the
whole input ahead).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter, deque
from typing import Iterable, Iterator

import numpy as np

_tokenizer = None
_eot = None


def _init(tokenizer_json: str, worker: bool = True) -> None:
    global _tokenizer, _eot
    if worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    import tokenizers
    _tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    _tokenizer.encode_special_tokens = True
    _eot = _tokenizer.token_to_id("<|eot|>")


def encode_chunk(chunk: list[tuple]) -> tuple[np.ndarray, int, Counter, Counter, Counter]:
    """[(text, source[, lang[, emit, natural]]), ...] -> (ids with <|eot|> after every emitted
    document as uint32, number of emitted documents, tokens per source, text bytes per source,
    tokens per language). An item with emit False is only counted: its tokens go to
    "LANG/natural" (the corpus before the mixture) and nowhere else; natural True counts an
    emitted item there too."""
    encodings = _tokenizer.encode_batch([item[0] for item in chunk], add_special_tokens=False)
    tokens, nbytes, langs, parts = Counter(), Counter(), Counter(), []
    docs = 0
    for item, enc in zip(chunk, encodings):
        text, source = item[0], item[1]
        lang = item[2] if len(item) > 2 else "und"
        emit, natural = (item[3], item[4]) if len(item) > 4 else (True, False)
        n = len(enc.ids) + 1
        if natural:
            langs[f"{lang}/natural"] += n
        if not emit:
            continue
        docs += 1
        parts.append(np.asarray(enc.ids, dtype=np.uint32))
        parts.append(np.asarray([_eot], dtype=np.uint32))
        tokens[source] += n
        langs[lang] += n
        nbytes[source] += len(text.encode("utf-8"))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return ids, docs, tokens, nbytes, langs


def encode_chunks(chunks: Iterable[list[tuple]], tokenizer_json: str,
                  workers: int) -> Iterator[tuple[np.ndarray, int, Counter, Counter, Counter]]:
    """encode_chunk over `chunks`, in order; `workers` <= 1 means in this process."""
    if workers <= 1:
        _init(tokenizer_json, worker=False)  # tokenizers may use its own threads here
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(tokenizer_json,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
