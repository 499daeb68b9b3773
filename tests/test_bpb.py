"""One held-out bits/byte (eval/bpb.py heldout): it scores every target of the val split once,
a subset is fixed and spread over the split, per-source numbers add up to the total, and the
pretraining loop, `llmforge eval` and bench/quality_bpb.py give the same number for one
checkpoint."""
from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmforge.cli import main
from llmforge.data.shards import TokenShards
from llmforge.errors import UserError
from llmforge.eval import bpb
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir

EOT = 3
ROOT = Path(__file__).resolve().parents[1]


def write_val(folder: Path, shards: list[np.ndarray]) -> TokenShards:
    entries = []
    for i, ids in enumerate(shards):
        name = f"val_{i:03d}.bin"
        ids.astype(np.uint16).tofile(folder / name)
        entries.append({"file": name, "tokens": len(ids), "size": 2 * len(ids)})
    manifest = {"dtype": "uint16", "eot_id": EOT, "splits": {"val": {"shards": entries}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return TokenShards(folder, "val")


def random_docs(rng, n_docs: int, vocab: int) -> list[np.ndarray]:
    """Documents of random length, each ending with EOT (as the shards hold them)."""
    docs = []
    for _ in range(n_docs):
        body = rng.integers(4, vocab, size=int(rng.integers(5, 60)))
        docs.append(np.concatenate([body, [EOT]]))
    return docs


@pytest.fixture
def setup(tmp_path, tiny_model_cfg):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 23, tiny_model_cfg.vocab_size)
    # two shards, cut between documents as data prepare cuts them
    val = write_val(tmp_path, [np.concatenate(docs[:9]), np.concatenate(docs[9:])])
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg).eval()
    token_bytes = torch.tensor(rng.integers(1, 5, size=tiny_model_cfg.vocab_size))
    token_bytes[:4] = 0   # ids 0-3 are "special": zero bytes
    return model, val, token_bytes, docs


def brute_force(model, stream: np.ndarray, token_bytes, seq_len: int, sources=None, doc_of=None):
    """Score each non-overlapping window of the stream separately, the obvious way."""
    nats = loss = 0.0
    n_bytes = 0
    per = {}
    for s in range(0, len(stream) - 1, seq_len):
        x = torch.tensor(stream[s:min(s + seq_len, len(stream) - 1)])[None]
        y = torch.tensor(stream[s + 1:s + 1 + x.shape[1]])
        with torch.no_grad():
            losses = F.cross_entropy(model(x)[0].float(), y, reduction="none")
        for j in range(len(y)):
            loss += float(losses[j])
            b = int(token_bytes[y[j]])
            if b:
                nats += float(losses[j])
                n_bytes += b
                if sources is not None:
                    src = sources[doc_of[s + j]]
                    per.setdefault(src, [0.0, 0])
                    per[src][0] += float(losses[j])
                    per[src][1] += b
    return loss / (len(stream) - 1), nats / math.log(2) / n_bytes, n_bytes, per


def test_heldout_scores_every_target_once_like_brute_force(setup):
    model, val, token_bytes, docs = setup
    tokens = np.concatenate(docs)
    stream = np.concatenate([[EOT], tokens])
    sources = ["code" if i % 3 else "prose" for i in range(len(docs))]
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])   # document of token i
    for seq_len in (16, 64, 7):
        out = bpb.heldout(model, val, token_bytes, seq_len, doc_sources=sources, batch_size=3)
        loss, bits, n_bytes, per = brute_force(model, stream, token_bytes, seq_len, sources, doc_of)
        assert out["val_tokens"] == len(tokens) and out["val_bytes"] == n_bytes and out["val_seq_len"] == seq_len
        assert out["val_loss"] == pytest.approx(loss, rel=1e-5)
        assert out["val_bpb"] == pytest.approx(bits, rel=1e-5)
        for src, (src_nats, src_bytes) in per.items():
            assert out[f"val_bpb_{src}"] == pytest.approx(src_nats / math.log(2) / src_bytes, rel=1e-5)
    # the eot id comes from the manifest when not given
    assert bpb.heldout(model, val, token_bytes, 16) == bpb.heldout(model, val, token_bytes, 16, eot_id=EOT)


def test_subset_is_fixed_spread_and_within_budget(setup):
    model, val, token_bytes, docs = setup
    n = sum(len(d) for d in docs)
    spans = bpb.windows(n, 16)
    assert sum(length for _, length in spans) == n        # every target once
    assert [s for s, _ in spans] == list(range(0, n, 16))
    sub = bpb.windows(n, 16, max_tokens=64)
    assert len(sub) == 4 and all(length == 16 for _, length in sub)
    assert sub[0][0] < n // 4 and sub[-1][0] > n // 2     # spread over the split, not a prefix
    a = bpb.heldout(model, val, token_bytes, 16, max_tokens=64)
    b = bpb.heldout(model, val, token_bytes, 16, max_tokens=64)
    assert a == b and a["val_tokens"] == 64
    assert bpb.windows(n, 16, max_tokens=0) == spans and bpb.windows(n, 16, max_tokens=10 * n) == spans


def test_sources_must_match_documents_and_empty_split_is_a_user_error(setup, tmp_path):
    model, val, token_bytes, docs = setup
    with pytest.raises(UserError, match="context"):
        bpb.heldout(model, val, token_bytes, model.cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="documents"):
        bpb.heldout(model, val, token_bytes, 16, doc_sources=["x"] * (len(docs) - 1))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"dtype": "uint16", "eot_id": EOT,
                                                     "splits": {"val": {"shards": []}}}))
    with pytest.raises(UserError, match="no tokens"):
        bpb.heldout(model, TokenShards(empty, "val"), token_bytes, 16)


# ------------------------------------------------------------------ one number from every caller

TOY = ["--preset", "micro", "--set", "tokenizer.vocab_size=300", "--set", "data.val_fraction=0.25",
       "--set", "pretrain.max_steps=3", "--set", "pretrain.batch_size=4", "--set", "pretrain.seq_len=64",
       "--set", "model.max_seq_len=64", "--set", "pretrain.eval_every=0", "--set", "pretrain.eval_batches=0",
       "--set", "pretrain.warmup_steps=1", "--set", "pretrain.dtype=fp32"]


def test_one_bpb_from_every_caller(tmp_path, capsys, monkeypatch):
    root = tmp_path / "run"
    sources = tmp_path / "sources.toml"
    sources.write_text('[[data.sources]]\nname = "stdlib"\nkind = "stdlib"\ncode = true\nmax_docs = 12\n'
                       '[[data.sources]]\nname = "pydoc"\nkind = "pydoc"\nmax_docs = 12\n')
    assert main(["data", "prepare", "--out", str(root), *TOY, "--config", str(sources)]) == 0
    assert main(["pretrain", "--out", str(root)]) == 0   # eval_batches=0: the loop scores the whole split
    run = RunDir(root)
    loop = [r for r in run.read_metrics("pretrain") if "val_bpb" in r][-1]

    from llmforge.eval.bpb import heldout_of_run
    from llmforge.train.checkpoint import load_model, load_tokenizer
    model, _, folder = load_model(run.ckpt("base"))
    model.eval()
    tok = load_tokenizer(folder)
    record = heldout_of_run(model, run, tok)

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["quality_bpb.py", str(root)])
    runpy.run_path(str(ROOT / "bench" / "quality_bpb.py"), run_name="__main__")
    out = capsys.readouterr().out
    bench = float(next(line.split()[1] for line in out.splitlines() if line.startswith("model ")))

    assert loop["val_tokens"] == record["val_tokens"] and loop["val_bytes"] == record["val_bytes"]
    assert loop["val_seq_len"] == record["val_seq_len"] == 64
    assert loop["val_bpb"] == pytest.approx(record["val_bpb"], rel=1e-6)
    assert bench == pytest.approx(record["val_bpb"], abs=1e-3)   # printed with 3 decimals
    for name in ("gzip -9", "bz2 -9", "xz -9e"):
        assert any(line.startswith(name) for line in out.splitlines())
    # per data source: both sources have val documents; bytes-weighted they make the total
    docs = bpb.val_documents(run.data)
    per_bytes = {}
    for d in docs:
        per_bytes[d["source"]] = per_bytes.get(d["source"], 0) + len(d["text"].encode("utf-8"))
    assert len(per_bytes) == 2 and sum(per_bytes.values()) == record["val_bytes"]
    total = sum(record[f"val_bpb_{s}"] * b for s, b in per_bytes.items()) / record["val_bytes"]
    assert total == pytest.approx(record["val_bpb"], rel=1e-6)
    assert {f"val_bpb_{s}" for s in per_bytes} <= set(loop)
