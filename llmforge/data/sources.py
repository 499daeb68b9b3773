"""Where documents come from. Each source kind yields dicts {"text", "source", "id"} in a
deterministic order, so the same config always produces the same corpus.

    stdlib  the running interpreter's standard-library .py files (built in: no download)
    pydoc   the reference-manual topics shipped with Python (pydoc_data.topics)
    files   local paths or globs: .txt .md .py (one document per file), .jsonl (one per
            line, text in `text_field`), .parquet (one per row, via pyarrow)
    hf      `datasets.load_dataset(path)`: a hub name or a local dataset folder
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from llmforge.config import SourceConfig
from llmforge.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
KINDS = ("stdlib", "pydoc", "files", "hf")


def iter_documents(src: SourceConfig) -> Iterator[dict]:
    """Documents of one source, at most src.max_docs of them (0 = all)."""
    if src.kind not in KINDS:
        raise UserError(f"data source '{src.name}' has unknown kind '{src.kind}'; "
                        f"use one of: {', '.join(KINDS)}")
    reader = {"stdlib": _stdlib, "pydoc": _pydoc, "files": _files, "hf": _hf}[src.kind]
    count = 0
    for doc in reader(src):
        if src.max_docs and count >= src.max_docs:
            break
        doc["source"] = src.name
        yield doc
        count += 1
    if count == 0:
        raise UserError(f"data source '{src.name}' ({src.kind} {src.path!r}) produced no documents; "
                        "point it at non-empty files or remove it from data.sources")


# ------------------------------------------------------------------ built-in corpora

def stdlib_files(include_tests: bool = True) -> list[Path]:
    """The interpreter's own .py files, sorted by relative path (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # prune: site-packages is huge
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib(src: SourceConfig) -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(src.include_tests):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            # A few test fixtures are deliberately in other encodings: skip, the user can't fix them.
            continue
        yield {"id": f"stdlib:{path.relative_to(root).as_posix()}", "text": text}


def _pydoc(src: SourceConfig) -> Iterator[dict]:
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield {"id": f"pydoc:{name}", "text": topics[name]}


# ------------------------------------------------------------------ user corpora

def expand_paths(src: SourceConfig) -> list[Path]:
    """The files a `files` source names, in sorted order; UserError if a pattern matches nothing."""
    if not src.path.strip():
        raise UserError(f"data source '{src.name}' (kind files) has no path; "
                        "set its path to a file, folder or glob (comma-separated ok)")
    paths: list[Path] = []
    for pattern in (p.strip() for p in src.path.split(",") if p.strip()):
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise UserError(f"data source '{src.name}': {pattern} matches no files; "
                            "fix the path or glob (quote globs so the shell does not expand them)")
        for m in map(Path, matches):
            if m.is_dir():
                paths += sorted(p for p in m.rglob("*") if p.is_file() and _readable_kind(p))
            else:
                paths.append(m)
    return paths


def _readable_kind(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES | {".jsonl", ".parquet"}


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (bad byte at offset {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None


def _files(src: SourceConfig) -> Iterator[dict]:
    for path in expand_paths(src):
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = _read_text(path)
            if text.strip():
                yield {"id": str(path), "text": text}
        elif suffix == ".jsonl":
            yield from _jsonl(path, src.text_field)
        elif suffix == ".parquet":
            yield from _parquet(path, src.text_field)
        else:
            raise UserError(f"{path} has an unsupported type '{suffix}'; use .txt .md .py .rst .jsonl or .parquet")


def _jsonl(path: Path, field: str) -> Iterator[dict]:
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); fix or delete that line") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{n} has no string field '{field}'; set the source's text_field "
                            "to the field holding the text")
        yield {"id": f"{path}:{n}", "text": text}


def _parquet(path: Path, field: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; `pip install pyarrow`") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({e}); re-export it") from None
    if field not in table.schema_arrow.names:
        raise UserError(f"{path} has no column '{field}' (columns: {', '.join(table.schema_arrow.names)}); "
                        "set the source's text_field")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield {"id": f"{path}:{row}", "text": text}
            row += 1


def _hf(src: SourceConfig) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source '{src.name}' (kind hf) needs the `datasets` library; "
                        "`pip install datasets`, or export the data to .jsonl and use kind files") from None
    if not src.path:
        raise UserError(f"data source '{src.name}' (kind hf) has no path; set it to a dataset name or local folder")
    try:
        ds = datasets.load_dataset(src.path, split=src.split, streaming=True)
    except Exception as e:
        raise UserError(f"cannot load dataset '{src.path}' split '{src.split}' ({str(e).splitlines()[0][:160]}); "
                        "check the name/path and split") from None
    for i, record in enumerate(ds):
        text = record.get(src.text_field)
        if not isinstance(text, str):
            raise UserError(f"dataset '{src.path}' row {i} has no string field '{src.text_field}'; "
                            "set the source's text_field")
        if text.strip():
            yield {"id": f"{src.path}:{i}", "text": text}
