"""`llmforge data prepare`: sources -> clean -> dedup -> mix -> tokenizer -> token shards.

    llmforge data prepare --out runs/demo --preset micro

Three steps, each skipped on a re-run when its output is already there for the same
settings:
  1. collect_documents: read every source, identify each document's language (data/langid.py),
     keep the languages the source asks for, clean (rules per script), deduplicate across
     sources, assign each document its split and copy count (source weight x language
     weight); writes data/docs.jsonl (one cleaned, unique document per line, with its "lang")
     and data/docs_stats.json (counts per source, language and rule).
  2. train_tokenizer (only when RUN/tokenizer/tokenizer.json is missing): BPE on a sample
     of the training mixture, cfg.tokenizer.sample_bytes of it.
  3. write_shards: tokenize in a process pool, write data/{train,val}_NNN.bin; completed
     shards are listed in data/progress.json, so an interrupted run resumes after them.
     data/manifest.json is written last and describes everything.

The training stream visits the mixture in epochs: pass k emits the training documents
with more than k copies (see mixture.py), so repeated copies of a document are far apart.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import sysconfig
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from llmforge.config import Config, to_dict
from llmforge.data import mixture
from llmforge.data.clean import clean_document
from llmforge.data.dedup import Deduplicator, exact_key
from llmforge.data.encode import encode_chunks
from llmforge.data.langid import CHAR_LANGUAGES, language
from llmforge.data.shards import MANIFEST, ShardWriter, token_dtype
from llmforge.data.sources import expand_paths, iter_documents
from llmforge.errors import UserError
from llmforge.run import RunDir, atomic_path, write_json_atomic
from llmforge.tokenizer.bpe import Tokenizer

DOCS = "docs.jsonl"
DOCS_STATS = "docs_stats.json"
PROGRESS = "progress.json"
CHUNK_BYTES = 1 << 20          # text per tokenization task (less when shards are small, see below)
POOL_MIN_BYTES = 4 << 20       # smaller splits tokenize in-process: a pool's start-up would cost more


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> dict:
    """A JSON file we wrote earlier, or {} if it is missing or damaged (then we redo its step)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _workers(cfg: Config) -> int:
    if cfg.data.workers > 0:
        return cfg.data.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------ 1. documents

def _docs_key(cfg: Config) -> str:
    """Everything the cleaned documents depend on: a change means collect again."""
    d = to_dict(cfg.data)
    inputs = []
    for src in cfg.data.sources:
        if src.kind == "files":  # user files may be edited between runs
            for path in expand_paths(src):
                st = path.stat()
                inputs.append((str(path), st.st_size, st.st_mtime_ns))
    settings = {k: d[k] for k in ("sources", "clean", "val_fraction", "dedup_exact", "dedup_near",
                                  "near_threshold", "num_perm", "shingle_words", "seed",
                                  "clean_chars", "shingle_chars", "language_weights", "engine")}
    return _sha([settings, inputs, sys.version, sysconfig.get_paths()["stdlib"]])


def collect_documents(cfg: Config, run: RunDir) -> dict:
    """Step 1. Returns the stats (also in data/docs_stats.json)."""
    stats_path, docs_path = run.data / DOCS_STATS, run.data / DOCS
    key = _docs_key(cfg)
    if docs_path.is_file():
        stats = _read_json(stats_path)
        if stats.get("key") == key:
            return stats
    if not cfg.data.sources:
        raise UserError("data.sources is empty; add at least one [[data.sources]] table to the config")
    if len({s.name for s in cfg.data.sources}) != len(cfg.data.sources):
        raise UserError("two data.sources share a name; give every source a unique name")

    started = time.time()
    lang_weights = language_weights(cfg)
    if cfg.data.engine not in ("builtin", "datatrove"):
        raise UserError(f"data.engine = '{cfg.data.engine}' is unknown; use builtin or datatrove")
    if cfg.data.engine == "datatrove":
        stats = _collect_datatrove(cfg, run, lang_weights)
        stats.update(key=key, seconds=round(time.time() - started, 2))
        write_json_atomic(stats_path, stats)
        return stats
    dd = Deduplicator(cfg.data.dedup_exact, cfg.data.dedup_near, cfg.data.near_threshold,
                      cfg.data.num_perm, cfg.data.shingle_words, cfg.data.shingle_chars)
    per_source = {s.name: Counter() for s in cfg.data.sources}
    removed = {s.name: Counter() for s in cfg.data.sources}
    per_lang: dict[str, Counter] = defaultdict(Counter)
    removed_lang: dict[str, Counter] = defaultdict(Counter)
    smallest_train = None  # (split hash, line number): moved to val if val ends up empty
    lines = checked = 0
    with atomic_path(docs_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for src in cfg.data.sources:
            counts = per_source[src.name]
            wanted = _languages_filter(src)
            seen_langs, dropped = Counter(), Counter()
            for doc in tqdm(iter_documents(src, dropped), desc=f"clean+dedup {src.name}", unit="doc",
                            total=src.max_docs or None, leave=False):
                nbytes = len(doc["text"].encode("utf-8"))
                counts["docs_raw"] += 1
                counts["bytes_raw"] += nbytes
                lang = "code" if src.code else language(doc["text"])
                seen_langs[lang] += 1
                lc = per_lang[lang]
                lc["docs_raw"] += 1
                lc["bytes_raw"] += nbytes
                if wanted and lang not in wanted:
                    removed[src.name]["language_filtered"] += 1
                    removed_lang[lang]["language_filtered"] += 1
                    continue
                family = "chars" if lang in CHAR_LANGUAGES else "words"
                text, reason = clean_document(doc["text"], code=src.code, rules=cfg.data.clean,
                                              char_rules=cfg.data.clean_chars, family=family)
                if text is None:
                    removed[src.name][reason] += 1
                    removed_lang[lang][reason] += 1
                    continue
                counts["docs_clean"] += 1
                counts["bytes_clean"] += len(text.encode("utf-8"))
                doc_key = exact_key(text)
                checked += 1  # a unique LSH key even if two sources share a document id
                duplicate = dd.check(str(checked), text, doc_key, family=family)
                if duplicate:
                    removed[src.name][duplicate] += 1
                    removed_lang[lang][duplicate] += 1
                    continue
                split = mixture.split_of(doc_key, cfg.data.val_fraction)
                copies = mixture.copies(src.weight * lang_weights.get(lang, 1.0), doc_key, cfg.data.seed, split)
                lc["docs_dedup"] += 1
                lc["bytes_dedup"] += len(text.encode("utf-8"))
                lc[f"copies_{split}"] += copies
                counts["docs_dedup"] += 1
                counts["bytes_dedup"] += len(text.encode("utf-8"))
                counts[f"docs_{split}"] += 1
                counts[f"copies_{split}"] += copies
                if split == "train" and copies:
                    h = mixture.unit_hash("split", doc_key)
                    smallest_train = min(smallest_train or (h, lines), (h, lines))
                out.write(json.dumps({"id": doc["id"], "source": src.name, "lang": lang, "split": split,
                                      "copies": copies, "text": text}, ensure_ascii=False) + "\n")
                lines += 1
            removed[src.name].update(dropped)  # files the licence filter skipped
            if wanted and not any(seen_langs[lang] for lang in wanted):
                found = ", ".join(f"{lang} {n}" for lang, n in seen_langs.most_common(8))
                raise UserError(f"data source '{src.name}': the filter languages = {sorted(wanted)} keeps none of "
                                f"its {sum(seen_langs.values())} documents (found: {found}); fix the codes "
                                "(ISO 639-1, e.g. \"zh\", \"en\") or remove the filter")
        out.flush()
        if cfg.data.val_fraction > 0 and not any(c["docs_val"] for c in per_source.values()) \
                and smallest_train and lines > 1:
            _move_to_val(tmp, smallest_train[1], per_source)

    stats = {"key": key, "sources": {k: dict(v) for k, v in per_source.items()},
             "removed": {k: dict(v) for k, v in removed.items()}, "dedup": dict(dd.removed),
             "languages": {k: dict(v) for k, v in sorted(per_lang.items())},
             "removed_languages": {k: dict(v) for k, v in sorted(removed_lang.items())},
             "documents": lines, "seconds": round(time.time() - started, 2)}
    write_json_atomic(stats_path, stats)
    return stats


def _collect_datatrove(cfg: Config, run: RunDir, lang_weights: dict) -> dict:
    """Step 1 as a datatrove pipeline (data/datatrove_pipeline.py); the stats are counted from
    the documents it kept and the removals its filters logged."""
    try:
        from llmforge.data import datatrove_pipeline
    except ImportError:
        raise UserError("data.engine = 'datatrove' needs datatrove; `pip install 'llmforge[scale]'` "
                        "(or `pip install datatrove`), or set data.engine = 'builtin'") from None
    docs_path = run.data / DOCS
    per_source = {s.name: Counter() for s in cfg.data.sources}
    per_lang: dict[str, Counter] = defaultdict(Counter)
    with atomic_path(docs_path) as tmp:
        removed = datatrove_pipeline.collect(cfg, tmp, max(1, cfg.data.engine_tasks), lang_weights)
        lines, smallest_train = 0, None
        with open(tmp, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                nbytes = len(doc["text"].encode("utf-8"))
                for counts in (per_source[doc["source"]], per_lang[doc["lang"]]):
                    counts["docs_dedup"] += 1
                    counts["bytes_dedup"] += nbytes
                    counts[f"docs_{doc['split']}"] += 1
                    counts[f"copies_{doc['split']}"] += doc["copies"]
                if doc["split"] == "train" and doc["copies"]:
                    h = mixture.unit_hash("split", exact_key(doc["text"]))
                    smallest_train = min(smallest_train or (h, lines), (h, lines))
                lines += 1
        if cfg.data.val_fraction > 0 and not any(c["docs_val"] for c in per_source.values()) \
                and smallest_train and lines > 1:
            _move_to_val(tmp, smallest_train[1], per_source)
        for src in cfg.data.sources:
            filtered = removed.get(src.name, {}).get("language_filtered", 0)
            if src.languages and filtered and not per_source[src.name]["docs_dedup"] \
                    and not sum(v for r, v in removed.get(src.name, {}).items() if r != "language_filtered"):
                raise UserError(f"data source '{src.name}': the filter languages = {sorted(src.languages)} keeps "
                                f"none of its {filtered} documents; fix the codes (ISO 639-1, e.g. \"zh\", \"en\") "
                                "or remove the filter")
    dedup = Counter()
    for name, counts in per_source.items():
        counts["docs_raw"] = counts["docs_dedup"] + sum(removed.get(name, {}).values())
        for reason in ("exact_duplicate", "near_duplicate"):
            dedup[reason] += removed.get(name, {}).get(reason, 0)
            counts["docs_clean"] += removed.get(name, {}).get(reason, 0)
        counts["docs_clean"] += counts["docs_dedup"]  # bytes before cleaning and removals per language: builtin only
    return {"engine": "datatrove", "sources": {k: dict(v) for k, v in per_source.items()},
            "removed": {s.name: dict(removed.get(s.name, {})) for s in cfg.data.sources}, "dedup": dict(dedup),
            "languages": {k: dict(v) for k, v in sorted(per_lang.items())}, "removed_languages": {},
            "documents": lines}


def language_weights(cfg: Config) -> dict[str, float]:
    """data.language_weights as floats (a --set gives strings); UserError for a bad one."""
    weights = {}
    for lang, w in (cfg.data.language_weights or {}).items():
        try:
            weights[str(lang)] = float(w)
        except (TypeError, ValueError):
            raise UserError(f"data.language_weights.{lang} = {w!r} is not a number; "
                            "give a weight like 2.0 (1.0 = the source's weight unchanged)") from None
        if weights[str(lang)] < 0:
            raise UserError(f"data.language_weights.{lang} = {w} is negative; use 0 to drop the language")
    return weights


def _languages_filter(src) -> set[str]:
    langs = src.languages
    if isinstance(langs, str):
        langs = [x.strip() for x in langs.split(",") if x.strip()]
    if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
        raise UserError(f"data source '{src.name}': languages must be a list of codes like [\"zh\", \"en\"], "
                        f"got {src.languages!r}")
    return set(langs)


def _move_to_val(path: Path, line_no: int, per_source: dict) -> None:
    """The hash split left validation empty (tiny corpus): move the training document with
    the smallest split hash, so the choice stays deterministic."""
    with open(path, encoding="utf-8") as f:
        docs = f.readlines()
    doc = json.loads(docs[line_no])
    counts = per_source[doc["source"]]
    counts["docs_train"] -= 1
    counts["copies_train"] -= doc["copies"]
    counts["docs_val"] += 1
    counts["copies_val"] += 1
    doc.update(split="val", copies=1)
    docs[line_no] = json.dumps(doc, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(docs)


def _read_docs(run: RunDir) -> Iterator[dict]:
    with open(run.data / DOCS, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def mixture_stream(run: RunDir, split: str) -> Iterator[tuple[str, str, str, bool, bool]]:
    """(text, source, lang, emit, natural) of every document copy in `split`, epoch by epoch.
    The first pass also yields the documents the mixture left out (emit False), so the
    token counts before the mixture ("natural") cover every document once."""
    max_copies = 1
    epoch = 0
    while epoch < max_copies:
        for doc in _read_docs(run):
            if doc["split"] == split:
                max_copies = max(max_copies, doc["copies"])
                if doc["copies"] > epoch or epoch == 0:
                    yield doc["text"], doc["source"], doc.get("lang", "und"), doc["copies"] > epoch, epoch == 0
        epoch += 1


# ------------------------------------------------------------------ 2. tokenizer

def train_tokenizer(cfg: Config, run: RunDir) -> Tokenizer:
    """Step 2: learn BPE from ~cfg.tokenizer.sample_bytes of the training mixture and save
    it at run.tokenizer (replacing any tokenizer there)."""
    run.create()
    stats = collect_documents(cfg, run)
    train_bytes = _split_bytes(run, "train")
    if train_bytes == 0:
        raise UserError("no training documents survived cleaning; add data or loosen data.clean rules")
    # Each document copy is in the sample with the same probability, so the sample has the
    # mixture's proportions; the hash coin keeps it deterministic.
    rate = min(1.0, cfg.tokenizer.sample_bytes / train_bytes)

    def sample() -> Iterator[str]:
        taken = 0
        for doc in _read_docs(run):
            if doc["split"] != "train" or not doc["copies"]:
                continue
            if mixture.unit_hash("tokenizer", cfg.data.seed, doc["id"], doc["source"]) < rate * doc["copies"]:
                taken += len(doc["text"].encode("utf-8"))
                yield doc["text"]
                if taken >= cfg.tokenizer.sample_bytes:
                    return

    started = time.time()
    sample_mb = min(train_bytes, cfg.tokenizer.sample_bytes) / 1e6
    print(f"training BPE tokenizer: vocab {cfg.tokenizer.vocab_size} on ~{sample_mb:.1f} MB "
          f"of {stats['documents']} documents", file=sys.stderr)
    tok = Tokenizer.train(sample(), cfg.tokenizer.vocab_size, single_digits=cfg.tokenizer.single_digits,
                          whole_numbers=cfg.tokenizer.whole_numbers,
                          show_progress=sys.stderr.isatty(), cjk_chunk=cjk_chunk(cfg, stats))
    tok.save(run.tokenizer)
    run.log("tokenizer", vocab_size=tok.vocab_size, hash=tok.hash, seconds=round(time.time() - started, 2))
    return tok


AUTO_CJK_CHUNK = 4  # measured (issue 11 note): zh/en bytes/token 0.95 at 4, 0.93 at 3, 0.97 at 6, 1.00 unsplit


def cjk_chunk(cfg: Config, stats: dict) -> int:
    """tokenizer.cjk_chunk, with -1 (auto) resolved: on when the kept documents include
    Chinese or Japanese, off otherwise (so an English+code corpus gets GPT-4's split and
    exactly the tokenizer it always had)."""
    if cfg.tokenizer.cjk_chunk >= 0:
        return cfg.tokenizer.cjk_chunk
    kept = stats.get("languages", {})
    return AUTO_CJK_CHUNK if any(kept.get(lang, {}).get("docs_dedup") for lang in ("zh", "ja")) else 0


def _split_bytes(run: RunDir, split: str) -> int:
    """Text bytes of `split` with copies counted (the size of the mixture stream)."""
    total = 0
    for doc in _read_docs(run):
        if doc["split"] == split:
            total += len(doc["text"].encode("utf-8")) * doc["copies"]
    return total


# ------------------------------------------------------------------ 3. shards

def _chunks(stream: Iterator[tuple], max_bytes: int, sizes: deque | None = None) -> Iterator[list[tuple]]:
    """Lists of stream items of about max_bytes of text; each list's length goes to `sizes`."""
    chunk, size = [], 0
    for item in stream:
        chunk.append(item)
        size += len(item[0])
        if size >= max_bytes:
            if sizes is not None:
                sizes.append(len(chunk))
            yield chunk
            chunk, size = [], 0
    if chunk:
        if sizes is not None:
            sizes.append(len(chunk))
        yield chunk


def write_shards(cfg: Config, run: RunDir, tok: Tokenizer, stats: dict) -> dict:
    """Step 3. Returns the manifest."""
    dtype = token_dtype(tok.vocab_size)
    key = _sha([stats["key"], tok.hash, cfg.data.shard_tokens, dtype.name])
    progress_path = run.data / PROGRESS
    progress = _read_json(progress_path)
    if progress.get("key") != key:  # different documents or tokenizer: start over
        for old in list(run.data.glob("train_*.bin")) + list(run.data.glob("val_*.bin")):
            old.unlink()
        (run.data / MANIFEST).unlink(missing_ok=True)
        progress = {"key": key, "train": {"shards": [], "complete": False},
                    "val": {"shards": [], "complete": False}}
    for stale in run.data.glob(".*.tmp"):  # temp files of a killed run
        stale.unlink()
    for split in ("train", "val"):  # a recorded shard deleted or damaged since: redo from there
        shards = progress[split]["shards"]
        for i, entry in enumerate(shards):
            path = run.data / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                del shards[i:]
                progress[split]["complete"] = False
                break

    workers = _workers(cfg)
    # Shards close between chunks; a chunk of ~shard_tokens/2 bytes (a token is 2-4 bytes)
    # keeps each shard within ~25% of shard_tokens.
    chunk_bytes = max(16 << 10, min(CHUNK_BYTES, cfg.data.shard_tokens // 2))
    for split in ("train", "val"):
        state = progress[split]
        if state["complete"]:
            continue
        done = state["shards"]
        # Files past the last recorded shard are from an interrupted run: they get rewritten.
        position = done[-1]["next_doc"] if done else 0
        total_bytes = _split_bytes(run, split)
        stream = itertools.islice(mixture_stream(run, split), position, None)

        def record(entry: dict) -> None:
            done.append(entry)
            write_json_atomic(progress_path, progress)

        bar = tqdm(total=total_bytes, initial=sum(s["text_bytes"] for s in done), unit="B", unit_scale=True,
                   desc=f"tokenize {split}")
        pool_workers = workers if total_bytes >= POOL_MIN_BYTES else 1
        sizes: deque = deque()  # stream items per chunk, in order (results come back in order)
        with ShardWriter(run.data, split, dtype, cfg.data.shard_tokens, start_index=len(done),
                         on_shard=record) as writer:
            encoded = encode_chunks(_chunks(stream, chunk_bytes, sizes), tok.hf.to_str(), pool_workers)
            for ids, n_docs, source_tokens, source_bytes, lang_tokens in encoded:
                position += sizes.popleft()
                nbytes = sum(source_bytes.values())
                writer.add(ids, position, docs=n_docs, text_bytes=nbytes, source_tokens=source_tokens,
                           lang_tokens=lang_tokens)
                bar.update(nbytes)
        bar.close()
        state["complete"] = True
        write_json_atomic(progress_path, progress)
    return _manifest(cfg, tok, dtype, key, progress, stats)


def _manifest(cfg: Config, tok: Tokenizer, dtype, key: str, progress: dict, stats: dict) -> dict:
    splits = {}
    mix_tokens = defaultdict(Counter)
    lang_tokens = defaultdict(Counter)
    for split in ("train", "val"):
        shards = progress[split]["shards"]
        splits[split] = {
            "shards": [{k: s[k] for k in ("file", "tokens", "size", "sha256")} for s in shards],
            "tokens": sum(s["tokens"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "docs": sum(s["docs"] for s in shards),
        }
        for s in shards:
            for source, n in s["source_tokens"].items():
                mix_tokens[source][f"tokens_{split}"] += n
            for lang_key, n in s.get("lang_tokens", {}).items():
                lang, _, natural = lang_key.partition("/")
                lang_tokens[lang][f"tokens_{split}_natural" if natural else f"tokens_{split}"] += n
    sources = {}
    for src in cfg.data.sources:
        counts = dict(stats["sources"].get(src.name, {}))
        counts.update(mix_tokens[src.name])
        counts["weight"] = src.weight
        counts["kind"] = src.kind
        sources[src.name] = counts
    return {
        "version": 1, "key": key, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
        "dtype": dtype.name, "eot_id": tok.eot_id, "bos_id": tok.bos_id, "shard_tokens": cfg.data.shard_tokens,
        "splits": splits, "sources": sources, "dedup": stats["dedup"], "removed": stats["removed"],
        "languages": _language_table(stats, lang_tokens),
    }


def _language_table(stats: dict, lang_tokens: dict) -> dict:
    """Per language: documents, bytes, removals, and the train-token share before the mixture
    (every unique document once) and after it (the copies training sees)."""
    before_total = sum(c.get("tokens_train_natural", 0) for c in lang_tokens.values()) or 1
    after_total = sum(c.get("tokens_train", 0) for c in lang_tokens.values()) or 1
    table = {}
    for lang in sorted(set(stats.get("languages", {})) | set(lang_tokens)):
        row = dict(stats.get("languages", {}).get(lang, {}))
        row.update(lang_tokens.get(lang, {}))
        row["removed"] = stats.get("removed_languages", {}).get(lang, {})
        row["share_before"] = round(row.get("tokens_train_natural", 0) / before_total, 4)
        row["share_after"] = round(row.get("tokens_train", 0) / after_total, 4)
        table[lang] = row
    return table


# ------------------------------------------------------------------ the verb

def prepare(cfg: Config, run: RunDir) -> dict:
    """`llmforge data prepare`: returns the manifest (also written to data/manifest.json)."""
    started = time.time()
    run.create()
    stats = collect_documents(cfg, run)
    if run.tokenizer.is_file():
        tok = Tokenizer.load(run.tokenizer)
        if tok.vocab_size != cfg.tokenizer.vocab_size:
            print(f"note: {run.tokenizer} has vocab {tok.vocab_size}, config says tokenizer.vocab_size="
                  f"{cfg.tokenizer.vocab_size}; keeping the existing one (`llmforge tokenizer train` replaces it)",
                  file=sys.stderr)
    else:
        tok = train_tokenizer(cfg, run)
    manifest = write_shards(cfg, run, tok, stats)
    seconds = round(time.time() - started, 2)
    manifest_path = run.data / MANIFEST
    previous = _read_json(manifest_path)
    write_json_atomic(manifest_path, manifest)
    if previous != manifest:  # log only when something was (re)built
        for name, counts in manifest["sources"].items():
            run.log("data", source=name, **{k: v for k, v in counts.items() if k != "kind"},
                    removed=manifest["removed"].get(name, {}))
        run.log("data", train_tokens=manifest["splits"]["train"]["tokens"],
                val_tokens=manifest["splits"]["val"]["tokens"], dedup=manifest["dedup"], seconds=seconds)
    print(format_table(manifest))
    return manifest


def format_table(manifest: dict) -> str:
    """Per-source table: documents and megabytes through each step, tokens in the mix."""
    head = f"{'source':<12} {'weight':>6} {'docs':>7} {'cleaned':>7} {'unique':>7} {'MB in':>7} {'MB kept':>7} " \
           f"{'train tok':>10} {'val tok':>9}  removed"
    rows = [head, "-" * len(head)]
    for name, c in manifest["sources"].items():
        removed = ", ".join(f"{r} {n}" for r, n in sorted(manifest["removed"].get(name, {}).items()))
        mb_in, mb_kept = c.get("bytes_raw", 0) / 1e6, c.get("bytes_dedup", 0) / 1e6
        rows.append(f"{name:<12} {c['weight']:>6g} {c.get('docs_raw', 0):>7} {c.get('docs_clean', 0):>7} "
                    f"{c.get('docs_dedup', 0):>7} {mb_in:>7.2f} {mb_kept:>7.2f} "
                    f"{c.get('tokens_train', 0):>10} {c.get('tokens_val', 0):>9}  {removed or '-'}")
    langs = manifest.get("languages", {})
    if langs:
        head = f"{'language':<8} {'docs':>7} {'unique':>7} {'MB kept':>7} {'tokens before':>13} {'share':>6} " \
               f"{'tokens after':>12} {'share':>6}  removed"
        rows += ["", head, "-" * len(head)]
        for lang, c in langs.items():
            removed = ", ".join(f"{r} {n}" for r, n in sorted(c.get("removed", {}).items()))
            rows.append(f"{lang:<8} {c.get('docs_raw', 0):>7} {c.get('docs_dedup', 0):>7} "
                        f"{c.get('bytes_dedup', 0) / 1e6:>7.2f} {c.get('tokens_train_natural', 0):>13} "
                        f"{c['share_before']:>6.1%} {c.get('tokens_train', 0):>12} {c['share_after']:>6.1%}  "
                        f"{removed or '-'}")
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    rows.append(f"train: {tr['tokens']} tokens in {len(tr['shards'])} shard(s), "
                f"{tr['text_bytes'] / max(tr['tokens'], 1):.2f} bytes/token; val: {va['tokens']} tokens; "
                f"dtype {manifest['dtype']}, vocab {manifest['vocab_size']}")
    return "\n".join(rows)
