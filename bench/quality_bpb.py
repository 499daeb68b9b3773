"""Quality per compute: a checkpoint's held-out bits per byte next to gzip -9, bz2 -9 and
xz -9e on the same held-out bytes, per document and on the concatenation.

    llmforge data prepare --out runs/cpu
    llmforge pretrain --out runs/cpu --minutes 10
    python bench/quality_bpb.py runs/cpu                 # ckpt/base on runs/cpu's val split

    python bench/quality_bpb.py runs/cpu --ckpt runs/cpu/ckpt/sft

The model is scored by llmforge.eval.bpb.heldout, the one held-out bpb that the pretraining
loop, `llmforge eval` and the report also use: the whole validation split as one stream
(documents, each followed by <|eot|>, one <|eot|> in front), non-overlapping windows of the
model's context, every target once. Bits per byte divides the model's nats on non-special
tokens by the bytes those tokens decode to: the val documents' UTF-8 text with nothing
between them (<|eot|> is zero bytes).

The compressors get exactly those bytes (the val documents of data/docs.jsonl, in shard
order; the script checks that both byte counts agree), two ways:
  - per document: each document compressed alone, compressed sizes summed. This is what a
    model with a bounded context faces: no help from earlier files;
  - concatenation: all documents as one string, what the compressors are best at (xz's
    window holds the whole split, so a file can copy from any earlier file).
A second table does the same per data source.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import sys
import time
from pathlib import Path

import torch

from llmforge.data.shards import TokenShards, read_manifest
from llmforge.eval import bpb
from llmforge.run import RunDir
from llmforge.train.checkpoint import load_model, load_tokenizer


COMPRESSORS = {
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def compressed_bpb(docs: list[bytes]) -> dict[str, dict[str, float]]:
    """{compressor: {"per_doc": bits/byte with every document compressed alone (sizes summed),
    "concat": bits/byte of the concatenation}} at the compressors' strongest settings."""
    total = sum(len(d) for d in docs)
    out = {}
    for name, compress in COMPRESSORS.items():
        per_doc = sum(len(compress(d)) for d in docs)
        concat = len(compress(b"".join(docs)))
        out[name] = {"per_doc": 8 * per_doc / max(total, 1), "concat": 8 * concat / max(total, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory (its data/ holds the val split)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (default: RUN/ckpt/base)")
    ap.add_argument("--seq-len", type=int, default=0,
                    help="window length (default: the model's context, as every other caller)")
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
    docs = bpb.val_documents(run.data)
    sources = bpb.val_sources(val, tok.eot_id)
    if docs is None or sources is None:
        sys.exit(f"error: {run.data / bpb.DOCS} is missing or does not match the val shards; "
                 f"re-run `llmforge data prepare --out {run.root}`")
    texts = [d["text"].encode("utf-8") for d in docs]

    t0 = time.perf_counter()
    scores = bpb.heldout(model, val, bpb.token_bytes(tok, model.cfg.vocab_size), seq_len, eot_id=tok.eot_id,
                         doc_sources=sources, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    total = sum(len(t) for t in texts)
    print(f"held-out: {len(texts)} documents, {scores['val_tokens']:,} tokens; bytes counted by the model "
          f"{scores['val_bytes']:,}, bytes given to the compressors {total:,}")
    assert scores["val_bytes"] == total, "the model and the compressors would not see the same bytes"
    n_params = model.num_params()
    step, trained_tokens = config.get("step", "?"), config.get("tokens", 0)
    print(f"model: {folder} ({config.get('kind')}, {n_params / 1e6:.2f}M parameters, step {step}, "
          f"{trained_tokens:,} training tokens), context {seq_len}, whole split scored in {seconds:.1f} s "
          f"({scores['val_tokens'] / seconds:,.0f} tokens/s)")

    t0 = time.perf_counter()
    comp = compressed_bpb(texts)
    model_bpb = scores["val_bpb"]
    print(f"\n{'method':<10} {'per document':>12} {'concatenation':>13}   (bits/byte; ratio to the model)")
    print(f"{'model':<10} {model_bpb:12.3f} {'':>13}   context {seq_len} windows over the stream")
    for name, v in comp.items():
        print(f"{name:<10} {v['per_doc']:12.3f} {v['concat']:13.3f}   "
              f"{v['per_doc'] / model_bpb:.2f}x / {v['concat'] / model_bpb:.2f}x")

    print("\nper source (compressors per document):")
    names = sorted(set(sources))
    print(f"{'source':<12} {'docs':>5} {'bytes':>10} {'model':>7} " + " ".join(f"{n:>8}" for n in COMPRESSORS))
    for src in names:
        mine = [t for t, s in zip(texts, sources) if s == src]
        c = compressed_bpb(mine)
        print(f"{src:<12} {len(mine):>5} {sum(map(len, mine)):>10,} {scores.get(f'val_bpb_{src}', float('nan')):7.3f} "
              + " ".join(f"{c[n]['per_doc']:8.3f}" for n in COMPRESSORS))
    print(f"\nval loss {scores['val_loss']:.4f} nats/token over all {scores['val_tokens']:,} targets "
          f"(<|eot|> included); compressors took {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
