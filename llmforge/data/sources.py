"""Where documents come from. Each source kind yields dicts {"text", "source", "id"} in a
deterministic order, so the same config always produces the same corpus.

    stdlib  the running interpreter's standard-library .py files (built in: no download)
    pydoc   the reference-manual topics shipped with Python (pydoc_data.topics)
    files   local paths or globs: .txt .md .py (one document per file), .jsonl (one per
            line, text in `text_field`), .parquet (one per row, via pyarrow)
    hf      `datasets.load_dataset(path)`: a hub name or a local dataset folder
    manpages  the system's translated manual pages, /usr/share/man/<path>/man*/ (path: locale
            folders, comma-separated; default "zh_CN"). Debian's `manpages-zh` package gives
            ~750 pages of Chinese in zh_CN (Simplified) and zh_TW (Traditional), real prose
            written by people: `apt-get install manpages-zh` (scripts/setup.sh does it).

A bilingual Chinese + English + code mixture that runs out of the box is
llmforge/data/bilingual.toml (`llmforge data prepare --out runs/zh --config llmforge/data/bilingual.toml`).

`files` sources read text in `encoding` (UTF-8 by default), and refuse with one clear line a
file that is not in it (or mixes encodings), an empty text file, or a binary file with a text
extension. With `licenses` set, a file is kept only when its SPDX header or the LICENSE file
beside it (or in a folder above, up to the source's root) names an allowed licence
(data/licenses.py); the others are counted by reason.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sysconfig
from pathlib import Path
from collections import Counter
from typing import Iterator

from llmforge.config import SourceConfig
from llmforge.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
KINDS = ("stdlib", "pydoc", "files", "hf", "manpages")
MAN_ROOT = Path("/usr/share/man")


def iter_documents(src: SourceConfig, dropped: Counter | None = None) -> Iterator[dict]:
    """Documents of one source, at most src.max_docs of them (0 = all). Files a source
    skips on purpose (licence filter) are counted by reason in `dropped`."""
    if src.kind not in KINDS:
        raise UserError(f"data source '{src.name}' has unknown kind '{src.kind}'; "
                        f"use one of: {', '.join(KINDS)}")
    dropped = Counter() if dropped is None else dropped
    reader = {"stdlib": _stdlib, "pydoc": _pydoc, "files": lambda s: _files(s, dropped), "hf": _hf,
              "manpages": _manpages}[src.kind]
    count = 0
    for doc in reader(src):
        if src.max_docs and count >= src.max_docs:
            break
        doc["source"] = src.name
        yield doc
        count += 1
    if count == 0:
        why = f" (licence filter: {', '.join(f'{r} {n}' for r, n in sorted(dropped.items()))})" if dropped else ""
        raise UserError(f"data source '{src.name}' ({src.kind} {src.path!r}) produced no documents{why}; "
                        "point it at non-empty files, loosen its licenses, or remove it from data.sources")


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


_ROFF_ESCAPES = [(re.compile(p), r) for p, r in [
    (r"\\f(?:\(..|\[[^\]]*\]|.)", ""),        # font changes \fB \fI \fR \fP \f(CW
    (r"\\s[+-]?\d", ""),                          # size changes
    (r"\\\*(?:\(..|\[[^\]]*\]|.)", ""),         # string registers
    (r"\\\((?:em|en)", "—"), (r"\\\(bu", "•"), (r"\\\((?:aq|cq)", "'"), (r"\\\((?:dq|lq|rq)", '"'),
    (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""),     # other named glyphs
    (r"\\[-]", "-"), (r"\\e", "\\\\"), (r"\\ ", " "), (r"\\[&|^%c:]", ""), (r"\\(.)", r"\1"),
]]
_PO4A_IF = re.compile(r"^\.if\s+!'po4a'hide'\s+")
_ROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}


def roff_to_text(source: str) -> str:
    """The readable text of a man page in roff: macros become paragraph breaks or their
    arguments, comments and layout requests go, inline escapes become plain characters."""
    out: list[str] = []
    for line in source.splitlines():
        line = _PO4A_IF.sub("", line)  # po4a's translated pages guard option lines with this
        if line.startswith(('.\\"', "'\\\"")) or line.strip() == ".":
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            args = re.findall(r'"([^"]*)"|(\S+)', rest)
            words = [a or b for a, b in args]
            if macro in ("SH", "SS"):
                out += ["", " ".join(words)]
            elif macro in ("B", "I", "SM", "SB"):
                out.append(" ".join(words))
            elif macro in _ROFF_ALTERNATING:
                out.append("".join(words))
            elif macro in ("PP", "LP", "P", "TP", "sp", "br", "IP", "HP"):
                out.append("")
                if macro == "IP" and words:
                    out.append(words[0])
            continue  # .TH .nf .fi .RS .RE .in .ft and other layout requests
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _manpages(src: SourceConfig) -> Iterator[dict]:
    for locale in [p.strip() for p in (src.path or "zh_CN").split(",") if p.strip()]:
        root = Path(locale) if os.path.isabs(locale) else MAN_ROOT / locale
        pages = sorted(p for p in root.glob("man*/*") if p.is_file()) if root.is_dir() else []
        if not pages:
            raise UserError(f"data source '{src.name}' (kind manpages): no manual pages in {root}; install them "
                            "(Debian/Ubuntu: `apt-get install manpages-zh`) or remove the source")
        for page in pages:
            try:
                raw = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
                source = raw.decode("utf-8")
            except (OSError, EOFError, UnicodeDecodeError):
                continue  # a damaged system file: skip, the user can't fix it
            if source.lstrip().startswith(".so "):
                continue  # a link to another page
            yield {"id": f"man:{locale}/{page.parent.name}/{page.name}", "text": roff_to_text(source)}


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


def _guess_encoding(data: bytes) -> str | None:
    if len(data) < 200:  # too little text for a reliable guess
        return None
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return None
    best = from_bytes(data[:200_000]).best()
    return best.encoding if best else None


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of a user's file in `encoding`; a UserError naming the file and the fix when it
    is binary, in another encoding, or mixes encodings."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    utf16 = encoding.lower().replace("-", "").startswith(("utf16", "utf32"))
    nul = data.find(b"\x00", 0, 65536)
    if nul >= 0 and not utf16 and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path} is binary (NUL byte at offset {nul}), not {path.suffix} text; "
                        "remove it from the source's path or narrow the glob")
    try:
        return data.decode(encoding)
    except LookupError:
        raise UserError(f"unknown encoding '{encoding}' for {path}; set the source's encoding to a Python "
                        "codec name (utf-8, gb18030, big5, shift_jis, utf-16)") from None
    except UnicodeDecodeError as e:
        name = "UTF-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        line = data.count(b"\n", 0, e.start) + 1
        guess = _guess_encoding(data[e.start:]) if e.start else _guess_encoding(data)
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            guess = "utf-16"  # a UTF-16 byte-order mark
        if max(data[:e.start], default=0) >= 0x80:  # non-ASCII text decoded before the bad byte: two encodings
            what = (f"mixes encodings: valid {name} up to byte {e.start} (line {line}), then "
                    f"{guess or 'something else'}; convert that part, or split the file and set each part's encoding")
        else:
            hint = f"it looks like {guess}: set the source's encoding = \"{guess}\" or " if guess else ""
            what = (f"is not {name} (bad byte at offset {e.start}, line {line}); {hint}convert it, "
                    f"e.g. `iconv -f {guess or 'latin1'} -t utf-8 {path} > fixed{path.suffix}`")
        raise UserError(f"{path} {what}") from None


def _files(src: SourceConfig, dropped: Counter) -> Iterator[dict]:
    from llmforge.data.licenses import LicenseFilter
    licence = LicenseFilter(src) if src.licenses else None
    for path in expand_paths(src):
        suffix = path.suffix.lower()
        if licence is not None:
            reason = licence.check(path)
            if reason:
                dropped[reason] += 1
                continue
        if suffix in TEXT_SUFFIXES:
            text = _read_text(path, src.encoding)
            if text.strip():
                yield {"id": str(path), "text": text}
            elif suffix != ".py":  # an empty __init__.py is normal; an empty text file is a mistake
                raise UserError(f"{path} is empty; delete it or leave it out of data source '{src.name}' "
                                "(narrow its path or glob)")
        elif suffix == ".jsonl":
            yield from _jsonl(path, src.text_field)
        elif suffix == ".parquet":
            yield from _parquet(path, src.text_field)
        else:
            raise UserError(f"{path} has an unsupported type '{suffix}'; use .txt .md .py .rst .jsonl or .parquet")


def _jsonl(path: Path, field: str) -> Iterator[dict]:
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty; delete it or leave it out of the source's path")
    for n, line in enumerate(text.splitlines(), start=1):
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
