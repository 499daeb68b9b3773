"""Quality per compute: a checkpoint's held-out bits per byte next to gzip, bz2 and xz on the
same held-out bytes.

    llmforge data prepare --out runs/cpu
    llmforge pretrain --out runs/cpu --minutes 10
    python bench/quality_bpb.py runs/cpu                 # ckpt/base on runs/cpu's val split

    python bench/quality_bpb.py runs/cpu --ckpt runs/cpu/ckpt/sft --seq-len 128

The model is scored on the whole validation split, every token, through llmforge.eval.bpb:
the val shards are one stream (documents, each followed by <|eot|>), read in windows of
seq_len with the <|eot|> that precedes every document in training as the first context
token; the last window is shorter rather than dropped. Bits per byte divides the model's
nats on non-special tokens by the bytes those tokens decode to, which are the val
documents' UTF-8 text with nothing between them (<|eot|> is zero bytes). The compressors
get exactly that byte string (the val documents of data/docs.jsonl, in order); the script
checks that both byte counts agree before printing.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llmforge.data.shards import TokenShards, read_manifest
from llmforge.eval import bpb
from llmforge.run import RunDir
from llmforge.train.checkpoint import load_model, load_tokenizer


def heldout_bytes(run: RunDir) -> bytes:
    """The val documents' text as the shards hold it: in file order, each once, no separator
    (the shards separate documents with <|eot|>, a token of zero bytes)."""
    parts = []
    with open(run.data / "docs.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["split"] == "val" and doc["copies"] > 0:
                parts.append(doc["text"].encode("utf-8"))
    return b"".join(parts)


def val_windows(stream: torch.Tensor, seq_len: int, batch_size: int):
    """(x, y) batches covering every target of `stream` once: full windows of seq_len in
    batches, then one shorter window for the rest."""
    n_targets = len(stream) - 1
    starts = list(range(0, n_targets - seq_len + 1, seq_len))
    for i in range(0, len(starts), batch_size):
        rows = [stream[s:s + seq_len + 1] for s in starts[i:i + batch_size]]
        data = torch.stack(rows)
        yield data[:, :-1], data[:, 1:]
    tail = len(starts) * seq_len
    if tail < n_targets:
        rest = stream[tail:]
        yield rest[None, :-1], rest[None, 1:]


def compressed_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of the classic compressors at their strongest settings."""
    sizes = {
        "gzip -9": len(gzip.compress(data, compresslevel=9)),
        "bz2 -9": len(bz2.compress(data, compresslevel=9)),
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory (its data/ holds the val split)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (default: RUN/ckpt/base)")
    ap.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's context)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = RunDir(args.run)
    ckpt = Path(args.ckpt) if args.ckpt else run.ckpt("base")
    model, config, folder = load_model(ckpt)
    model.eval()
    tok = load_tokenizer(folder)
    manifest = read_manifest(run.data)
    if manifest["tokenizer_hash"] != tok.hash:
        sys.exit(f"error: {folder} was trained with another tokenizer than the shards in {run.data}")
    seq_len = args.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        sys.exit(f"error: --seq-len {seq_len} is longer than the model's context {model.cfg.max_seq_len}")

    val = TokenShards(run.data, "val")
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in val.shards])
    stream = torch.from_numpy(np.concatenate([[tok.eot_id], tokens]))  # the <|eot|> before doc 1
    token_bytes = torch.tensor(tok.token_bytes() + [0] * (model.cfg.vocab_size - tok.vocab_size))
    data = heldout_bytes(run)
    model_bytes = int(token_bytes[stream[1:]].sum())
    print(f"held-out: {len(tokens):,} tokens, {manifest['splits']['val']['docs']} documents; "
          f"bytes counted by the model {model_bytes:,}, bytes given to the compressors {len(data):,}")
    assert model_bytes == len(data), "the model and the compressors would not see the same bytes"

    t0 = time.perf_counter()
    with torch.no_grad():
        scores = bpb.evaluate(model, val_windows(stream, seq_len, args.batch_size), token_bytes)
    seconds = time.perf_counter() - t0

    n_params = model.num_params()
    step, trained_tokens = config.get("step", "?"), config.get("tokens", 0)
    print(f"model: {folder} ({config.get('kind')}, {n_params / 1e6:.2f}M parameters, step {step}, "
          f"{trained_tokens:,} training tokens), context {seq_len}, scored in {seconds:.1f} s")
    print(f"\n{'method':<14} {'bits/byte':>9} {'vs model':>9}")
    print(f"{'model':<14} {scores['val_bpb']:9.3f} {1.0:9.2f}")
    for name, value in compressed_bpb(data).items():
        print(f"{name:<14} {value:9.3f} {value / scores['val_bpb']:9.2f}")
    print(f"\nval loss {scores['val_loss']:.4f} nats/token over all {len(tokens):,} targets (<|eot|> included)")


if __name__ == "__main__":
    main()
