"""The run directory: where every stage reads its inputs and writes its outputs.

    runs/NAME/
      config.toml  data/  tokenizer/tokenizer.json  ckpt/{base,sft,rm,rl}/  prefs/
      metrics.jsonl  report.md  plots/

Files are written atomically (temp name + rename) so a crash never leaves half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move a finished temp folder onto `out`, replacing what was there. Between the two
    renames `out` is briefly absent, never half-written."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike, what: str):
    """Yield ("file:line", record) for each non-blank line of a user's JSONL file of `what`
    (e.g. "preference"); a missing file or a bad line is a UserError naming file:line."""
    from llmforge.errors import UserError
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; pass an existing .jsonl file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None


class RunDir:
    """Paths inside one run directory, plus the shared metrics log."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / "tokenizer.json"

    def ckpt(self, kind: str) -> Path:
        """Checkpoint folder of a stage: base, sft, rm, rm_safety, rl, ..."""
        return self.root / "ckpt" / kind

    @property
    def prefs(self) -> Path:
        return self.root / "prefs"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def log(self, stage: str, **values) -> None:
        """Append one metrics record. A line is written whole with one write() call, so a
        crash leaves at most a missing last line, never a torn one that breaks readers."""
        record = {"stage": stage, "time": round(time.time(), 3), **values}
        line = json.dumps(record, default=float) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(line)

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn final line from a killed process
            if stage is None or rec.get("stage") == stage:
                out.append(rec)
        return out
