"""Data pipeline: sources, quality filters, dedup, mixture, shards and the loader, prepare."""
import json
import random

import numpy as np
import pytest
import torch

from llmforge.config import CleanConfig, SourceConfig, resolve
from llmforge.data import mixture
from llmforge.data.clean import clean_document
from llmforge.data.dedup import Deduplicator, exact_key
from llmforge.data.shards import ShardWriter, TokenShards, token_dtype
from llmforge.data.sources import iter_documents, stdlib_files
from llmforge.errors import UserError
from llmforge.run import RunDir

GOOD = """Tokenizers split raw text into pieces that a language model can count and learn from.
A byte level vocabulary can represent every string, including emoji and rare scripts.
Merges are learned greedily, always joining the most frequent adjacent pair of symbols.
Training data is cleaned first, because noisy pages teach the model noisy habits.
Duplicated documents are removed so that the model does not memorize repeated text.
Each source in the mixture gets a weight that says how often it should be seen.
Validation documents are held out by hash, which keeps the split stable across runs.
Shards are flat files of token ids that the training loop reads through a memory map.
"""

GOOD_CODE = '''import math


def area(radius: float) -> float:
    """Area of a circle."""
    # pi r squared
    return math.pi * radius ** 2


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y  # coordinates

    def norm(self):
        return math.hypot(self.x, self.y)
'''


def _lines(template: str, n: int) -> str:
    return "".join(template.format(i=i) for i in range(n))


# ------------------------------------------------------------------ clean

def test_good_prose_is_kept_unchanged():
    assert clean_document(GOOD) == (GOOD, "kept")


@pytest.mark.parametrize("text, rules, reason", [
    ("   \n\t\n", None, "empty"),
    (GOOD, CleanConfig(max_chars=100), "too_long"),
    ("Just a short note with very few words in it.", None, "too_few_words"),
    (GOOD, CleanConfig(max_words=50), "too_many_words"),
    (" ".join(f"extraordinarilylongwordnumber{i}" for i in range(80)), None, "mean_word_length"),
    (" ".join(f"aa{i % 7} b" for i in range(80)), None, "mean_word_length"),
    (GOOD + " ".join(f"#trending{i}" for i in range(30)), None, "symbol_ratio"),
    (GOOD + " ".join(str(1000 + i) for i in range(60)), None, "alpha_ratio"),
    (_lines("Story {i} continues with many more shocking details you will never believe here...\n", 10),
     None, "ellipsis_lines"),
    (_lines("- item {i} is a bullet point with several words describing the thing\n", 10), None, "bullet_lines"),
    (GOOD + "Buy cheap watches today at the best online store in town.\n" * 10, None, "duplicate_lines"),
    (GOOD + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n", None, "lorem_ipsum"),
    (GOOD + _lines("This site uses cookies {i}; see our privacy policy and accept cookies.\n", 10),
     None, "boilerplate"),
])
def test_each_prose_rule_removes_its_kind(text, rules, reason):
    assert clean_document(text, code=False, rules=rules) == (None, reason)


def test_a_few_boilerplate_lines_are_dropped_and_the_page_kept():
    text, reason = clean_document(GOOD + "Please enable JavaScript to view the comments.\n")
    assert reason == "kept" and text == GOOD


def test_code_gets_lighter_rules():
    assert clean_document(GOOD_CODE, code=False)[0] is None  # prose statistics reject code
    assert clean_document(GOOD_CODE, code=True) == (GOOD_CODE, "kept")


@pytest.mark.parametrize("text, reason", [
    ("x = 1\n", "too_short"),
    (GOOD_CODE + "BLOB = '" + "a" * 2000 + "'\n", "long_lines"),
    (_lines("# {i} " + "=-" * 30 + "\n", 20), "alnum_ratio"),
    (GOOD_CODE + "print('hello world')\n" * 40, "duplicate_lines"),
])
def test_each_code_rule_removes_its_kind(text, reason):
    assert clean_document(text, code=True) == (None, reason)


# ------------------------------------------------------------------ dedup

def _words(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    return [rng.choice(vocab) for _ in range(n)]


def test_exact_dedup_ignores_case_and_whitespace():
    dd = Deduplicator(near=False)
    assert dd.check("a", "Hello   World\nagain") is None
    assert dd.check("b", "hello world again ") == "exact_duplicate"
    assert dd.check("c", "hello world, again") is None
    assert dd.removed == {"exact_duplicate": 1}
    assert exact_key("A  b") == exact_key("a b")


def test_near_dedup_removes_lightly_edited_copy_keeps_different_doc():
    original = _words(0)
    edited = list(original)
    for i in (40, 150, 260):
        edited[i] = "changed"
    dd = Deduplicator(exact=True, near=True, threshold=0.8, num_perm=128)
    assert dd.check("orig", " ".join(original)) is None
    assert dd.check("edit", " ".join(edited)) == "near_duplicate"
    assert dd.check("other", " ".join(_words(1))) is None
    assert dd.removed == {"near_duplicate": 1}


# ------------------------------------------------------------------ mixture

KEYS = [exact_key(f"document {i}") for i in range(4000)]


@pytest.mark.parametrize("weight", [0.25, 1.0, 1.5, 2.0, 3.7])
def test_weight_means_floor_plus_bernoulli_of_the_fraction(weight):
    counts = [mixture.copies(weight, k, seed=0) for k in KEYS]
    assert set(counts) <= {int(weight), int(weight) + 1}
    assert abs(np.mean(counts) - weight) < 0.03
    assert counts == [mixture.copies(weight, k, seed=0) for k in KEYS]  # deterministic
    if weight % 1:
        assert counts != [mixture.copies(weight, k, seed=1) for k in KEYS]  # the seed matters


def test_validation_is_never_upsampled_and_weight_zero_drops():
    assert {mixture.copies(3.5, k, seed=0, split="val") for k in KEYS[:100]} == {1}
    assert {mixture.copies(0.0, k, seed=0) for k in KEYS[:100]} == {0}


def test_split_by_hash_is_deterministic_and_sized():
    splits = [mixture.split_of(k, 0.1) for k in KEYS]
    assert splits == [mixture.split_of(k, 0.1) for k in KEYS]
    assert abs(splits.count("val") / len(KEYS) - 0.1) < 0.02
    assert {mixture.split_of(k, 0.0) for k in KEYS} == {"train"}


# ------------------------------------------------------------------ shards and loader

def _write_split(data_dir, split, chunks, dtype, shard_tokens):
    with ShardWriter(data_dir, split, dtype, shard_tokens) as w:
        for i, chunk in enumerate(chunks):
            w.add(chunk, position=i + 1, docs=1)
    return w.shards


def _write_manifest(data_dir, dtype, splits):
    (data_dir / "manifest.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "splits": {
        name: {"shards": shards} for name, shards in splits.items()}}))


@pytest.mark.parametrize("vocab_size, base", [(4096, 0), (100_000, 70_000)])
def test_shard_round_trip_and_windows_stay_inside_a_shard(tmp_path, vocab_size, base):
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size < 65536 else np.uint32)
    # chunk i holds 100 consecutive ids; each shard (3 chunks) starts at a new multiple of 1000,
    # so a window crossing a shard boundary would show a jump.
    chunks = [base + (i // 3) * 1000 + (i % 3) * 100 + np.arange(100, dtype=np.uint32) for i in range(10)]
    shards = _write_split(tmp_path, "train", chunks, dtype, shard_tokens=300)
    assert [s["tokens"] for s in shards] == [300, 300, 300, 100]
    assert [s["next_doc"] for s in shards] == [3, 6, 9, 10]
    assert not list(tmp_path.glob(".*.tmp"))
    _write_manifest(tmp_path, dtype, {"train": shards})

    data = TokenShards(tmp_path, "train")
    assert data.num_tokens == 1000
    assert np.array_equal(np.concatenate([np.asarray(s) for s in data.shards]), np.concatenate(chunks))
    x, y = data.sample_batch(64, 50, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 50) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bool((y - x == 1).all())  # contiguous windows, none spanning two shards
    assert int(x.min()) >= base
    # every valid window start (tokens - seq_len per shard) is reachable, and nothing else
    x, _ = data.sample_batch(20_000, 50, torch.Generator().manual_seed(1))
    valid = {int(s[0]) + j for s in data.shards for j in range(len(s) - 50)}
    assert set(x[:, 0].tolist()) == valid


def test_sample_batch_rows_consume_the_generator_like_a_full_batch(tmp_path):
    shards = _write_split(tmp_path, "train", [np.arange(500, dtype=np.uint32)], np.uint16, 1000)
    _write_manifest(tmp_path, np.uint16, {"train": shards})
    data = TokenShards(tmp_path, "train")
    g_full, g_part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_full, y_full = data.sample_batch(8, 16, g_full)
    x_part, y_part = data.sample_batch(8, 16, g_part, rows=slice(2, 5))
    assert torch.equal(x_part, x_full[2:5]) and torch.equal(y_part, y_full[2:5])
    assert torch.equal(g_full.get_state(), g_part.get_state())


def test_sequential_batches_are_deterministic_non_overlapping(tmp_path):
    shards = _write_split(tmp_path, "val", [np.arange(1000, dtype=np.uint32)], np.uint16, 10_000)
    _write_manifest(tmp_path, np.uint16, {"val": shards})
    data = TokenShards(tmp_path, "val")
    batches = list(data.sequential_batches(4, 10, max_batches=3))
    assert len(batches) == 3
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.tolist() == list(range(0, 120, 10))
    again = list(data.sequential_batches(4, 10, max_batches=3, rows=slice(1, 3)))
    assert all(torch.equal(a[0], b[0][1:3]) for a, b in zip(again, batches))
    # a split too small for one full batch still yields what it has
    assert [x.shape[0] for x, _ in data.sequential_batches(500, 10, max_batches=0)] == [99]


def test_truncated_missing_shard_and_missing_manifest_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data prepare"):
        TokenShards(tmp_path, "train")
    shards = _write_split(tmp_path, "train", [np.arange(500, dtype=np.uint32)], np.uint16, 1000)
    _write_manifest(tmp_path, np.uint16, {"train": shards})
    path = tmp_path / shards[0]["file"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(UserError, match="truncated or corrupt.*re-run `llmforge data prepare`"):
        TokenShards(tmp_path, "train")
    path.unlink()
    with pytest.raises(UserError, match="missing"):
        TokenShards(tmp_path, "train")
    with pytest.raises(UserError, match="no 'val' split"):
        TokenShards(tmp_path, "val")


def test_failed_shard_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", np.uint16, 1000) as w:
            w.add(np.arange(10, dtype=np.uint32), position=1)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_token_pool_matches_in_process_encoding():
    from llmforge.data.encode import encode_chunks
    from llmforge.tokenizer.bpe import Tokenizer
    tok = Tokenizer.train([GOOD, GOOD_CODE], vocab_size=300)
    chunks = [[(GOOD, "a"), (GOOD_CODE, "b")], [("ünïcode 😀", "a")], [(GOOD_CODE, "b")]]
    one = list(encode_chunks(chunks, tok.hf.to_str(), workers=1))
    two = list(encode_chunks(chunks, tok.hf.to_str(), workers=2))
    assert [r[1:] for r in one] == [r[1:] for r in two]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(one, two))
    ids, n_docs, tokens, nbytes, langs = one[0]
    assert n_docs == 2 and (ids == tok.eot_id).sum() == 2 and ids[-1] == tok.eot_id
    assert tokens["a"] == len(tok.encode(GOOD)) + 1 and nbytes["b"] == len(GOOD_CODE.encode())


# ------------------------------------------------------------------ sources

def _files_source(path, **kw) -> SourceConfig:
    return SourceConfig(name="mine", kind="files", path=str(path), **kw)


def test_files_source_reads_text_jsonl_parquet_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.md").write_text("# beta")
    (tmp_path / "c.jsonl").write_text('{"content": "one"}\n\n{"content": "two"}\n')
    pq.write_table(pa.table({"content": ["three", "four"]}), tmp_path / "d.parquet")
    (tmp_path / "e.py").write_text("")  # empty .py files (an __init__.py) are skipped
    docs = list(iter_documents(_files_source(tmp_path / "*", text_field="content")))
    assert [d["text"] for d in docs] == ["alpha text", "# beta", "one", "two", "three", "four"]
    assert {d["source"] for d in docs} == {"mine"} and len({d["id"] for d in docs}) == 6
    assert len(list(iter_documents(_files_source(tmp_path, text_field="content", max_docs=3)))) == 3


@pytest.mark.parametrize("setup, match", [
    (lambda d: str(d / "nothing*.txt"), "matches no files"),
    (lambda d: "", "has no path"),
    (lambda d: (d / "empty.txt").write_text("  \n") and str(d / "empty.txt"), r"empty\.txt is empty; delete it"),
    (lambda d: (d / "e.py").write_text("") or str(d / "e.py"), "produced no documents"),
    (lambda d: (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1")) and str(d / "latin.txt"),
     r"latin\.txt is not UTF-8.*iconv"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and str(d / "bad.jsonl"),
     r"bad\.jsonl:2 is not valid JSON"),
    (lambda d: (d / "f.jsonl").write_text('{"body": "x"}\n') and str(d / "f.jsonl"), "no string field 'text'"),
])
def test_bad_sources_are_user_errors(tmp_path, setup, match):
    with pytest.raises(UserError, match=match):
        list(iter_documents(_files_source(setup(tmp_path))))


def test_unknown_kind_and_missing_datasets_library():
    with pytest.raises(UserError, match="unknown kind"):
        list(iter_documents(SourceConfig(name="x", kind="web")))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install datasets"):
            list(iter_documents(SourceConfig(name="x", kind="hf", path="some/dataset")))


def test_stdlib_and_pydoc_sources_are_deterministic():
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and files == stdlib_files()
    assert not any("site-packages" in p.parts for p in files)
    assert len(stdlib_files(include_tests=False)) < len(files)
    docs = list(iter_documents(SourceConfig(name="py", kind="stdlib", max_docs=5)))
    assert len(docs) == 5 and all(d["id"].startswith("stdlib:") and d["source"] == "py" for d in docs)
    topics = list(iter_documents(SourceConfig(name="doc", kind="pydoc", max_docs=3)))
    assert [d["id"] for d in topics] == sorted(d["id"] for d in topics)


# ------------------------------------------------------------------ prepare end to end

@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    from llmforge.data.prepare import prepare
    cfg = resolve("micro")
    run = RunDir(tmp_path_factory.mktemp("run"))
    return cfg, run, prepare(cfg, run)


def test_micro_prepare_end_to_end(micro_run):
    from llmforge.tokenizer.bpe import Tokenizer
    cfg, run, manifest = micro_run
    tok = Tokenizer.load(run.tokenizer)
    sizes = [s["tokens"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) >= 3 and all(cfg.data.shard_tokens <= n < 1.5 * cfg.data.shard_tokens for n in sizes[:-1])
    assert manifest["tokenizer_hash"] == tok.hash and manifest["vocab_size"] == 512
    assert manifest["dtype"] == "uint16"
    assert json.loads((run.data / "manifest.json").read_text()) == manifest
    stdlib = manifest["sources"]["stdlib"]
    assert stdlib["docs_raw"] == 120 and stdlib["docs_dedup"] <= stdlib["docs_clean"] <= 120
    assert stdlib["tokens_train"] > 0 and manifest["sources"]["pydoc"]["tokens_train"] > 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        data = TokenShards(run.data, split)
        assert data.num_tokens == info["tokens"] > 0
        ids = np.concatenate([np.asarray(s) for s in data.shards])
        assert (ids == tok.eot_id).sum() == info["docs"] and ids[-1] == tok.eot_id
    # the first validation document decodes back to its cleaned text
    docs = [json.loads(line) for line in open(run.data / "docs.jsonl", encoding="utf-8")]
    first_val = next(d for d in docs if d["split"] == "val")
    val_ids = np.asarray(TokenShards(run.data, "val").shards[0])
    end = int(np.argmax(val_ids == tok.eot_id))
    assert tok.decode(val_ids[:end].tolist()) == first_val["text"]
    assert any(r["stage"] == "data" and r.get("source") == "stdlib" for r in run.read_metrics())


def test_prepare_rerun_skips_and_resumes_after_last_whole_shard(micro_run):
    from llmforge.data.prepare import prepare
    cfg, run, manifest = micro_run
    shard_files = sorted(run.data.glob("*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in shard_files]
    assert prepare(cfg, run) == manifest
    assert [p.stat().st_mtime_ns for p in shard_files] == mtimes
    # simulate a run killed while writing the last train shard
    progress = json.loads((run.data / "progress.json").read_text())
    assert len(progress["train"]["shards"]) >= 2
    lost = progress["train"]["shards"].pop()
    progress["train"]["complete"] = progress["val"]["complete"] = False
    progress["val"]["shards"] = []
    (run.data / "progress.json").write_text(json.dumps(progress))
    (run.data / lost["file"]).unlink()
    assert prepare(cfg, run) == manifest
    assert shard_files[0].stat().st_mtime_ns == mtimes[0]  # earlier shards were not rewritten
    # a finished shard deleted later is rebuilt, not listed as if present
    (run.data / "val_000.bin").unlink()
    assert prepare(cfg, run) == manifest
    assert TokenShards(run.data, "val").num_tokens == manifest["splits"]["val"]["tokens"]


def test_train_tokenizer_retrains_from_stored_documents(micro_run, tmp_path):
    from llmforge.data.prepare import train_tokenizer
    cfg, run, manifest = micro_run
    tok = train_tokenizer(cfg, run)
    assert tok.hash == manifest["tokenizer_hash"]  # same documents, same sample, same merges


def test_prepare_with_undecodable_file_leaves_nothing_behind(tmp_path):
    from llmforge.data.prepare import prepare
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "ok.txt").write_text(GOOD)
    (tmp_path / "corpus" / "zz.txt").write_bytes(b"\xff\xfe bad bytes")
    cfg = resolve("micro", overrides=[])
    cfg.data.sources = [_files_source(tmp_path / "corpus")]
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match="zz.txt is not UTF-8"):
        prepare(cfg, run)
    assert not (run.data / "docs.jsonl").exists()
    assert not [p for p in run.data.iterdir() if p.name.endswith(".tmp")]


def test_tiny_corpus_still_gets_one_validation_document(tmp_path):
    from llmforge.data.prepare import prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate((1, 2, 3)):
        (corpus / f"doc{i}.txt").write_text(GOOD + " ".join(_words(seed, 80)) + "\n")
    cfg = resolve("micro", overrides=["data.val_fraction=0.001", "tokenizer.vocab_size=300"])
    cfg.data.sources = [_files_source(corpus, weight=2.0)]
    manifest = prepare(cfg, RunDir(tmp_path / "run"))
    assert manifest["splits"]["val"]["docs"] == 1  # never upsampled
    assert manifest["splits"]["train"]["docs"] == 4  # the other two documents, twice each
    assert manifest["sources"]["mine"]["docs_val"] == 1
