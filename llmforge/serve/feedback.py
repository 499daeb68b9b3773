"""The feedback store: every conversation, draft, regeneration, edit and rating, and the
preference pairs they imply.

    store = open_store("runs/x/feedback.sqlite")          # or "postgresql://user@host/db"
    conv = store.new_conversation(title="hello")
    gen = store.log_generation(conv, prompt=[{"role": "user", "content": "hi"}], content="hey",
                               model="x-sft", checkpoint="runs/x/ckpt/sft@step400")
    store.edit(gen, "Hello! How can I help?")               # the user rewrote the answer and kept it
    store.rate(gen, +1)
    export_pairs(store, "runs/x/prefs/feedback.jsonl")      # what `llmforge feedback export` calls

Vocabulary. A *generation* (draft) is one answer the model produced for one prompt (the
messages before it) at one position of a conversation. Generating again at the same
position is a *regeneration*; the one the conversation continues with (or that the user
picks explicitly) is *chosen*, the others are discarded. Preference pairs, one JSON line each
{"prompt": [messages], "chosen": str, "rejected": str, "source": str, ...}:
  edit          the text the user kept after editing  ≻  the model's draft
  rating        an answer rated up  ≻  an answer rated down for the same prompt
  regeneration  the chosen regeneration  ≻  each discarded one

Images (a vision model's requests): a prompt's image_url parts are stored as "sha256:<hash>" of the
data URI, the data itself once per hash in the images table, and exported pairs carry the data
URIs again, so the flywheel's pairs include the images.

SQLite runs in WAL mode (readers never block the server's writes). The schema is created by
numbered migrations recorded in `schema_version`, so an old database upgrades in place.

Tenancy: every conversation belongs to a user (the API key that created it; "local" when the
server runs without keys). Reads and writes that name a user see only that user's rows; a row
of another user is reported exactly like a missing one (NotFoundError), so ids cannot be probed.
Pairs record their user, and export can keep some users only or cap the pairs per user, so one
user cannot flood the next training set. A SQLite file is created owner-only (0600).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from llmforge.errors import UserError
from llmforge.run import atomic_path

# Portable SQL (SQLite and PostgreSQL): text ids, DOUBLE PRECISION times, no autoincrement.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL)""",
        # The conversation as it currently reads (user turns, kept assistant answers).
        """CREATE TABLE messages (
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            generation_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (conversation_id, position))""",
        # Every answer the model produced, with what produced it.
        """CREATE TABLE generations (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            position INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            content TEXT NOT NULL,
            model TEXT NOT NULL,
            checkpoint TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            finish_reason TEXT NOT NULL DEFAULT '',
            chosen INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX generations_by_turn ON generations (conversation_id, position)",
        """CREATE TABLE edits (
            id TEXT PRIMARY KEY,
            generation_id TEXT NOT NULL REFERENCES generations(id),
            content TEXT NOT NULL,
            kept INTEGER NOT NULL DEFAULT 1,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE ratings (
            id TEXT PRIMARY KEY,
            generation_id TEXT NOT NULL REFERENCES generations(id),
            value INTEGER NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL)""",
    ]),
    (2, [   # tenancy: the user (API key) a conversation belongs to; older rows are "local"
        "ALTER TABLE conversations ADD COLUMN user_id TEXT NOT NULL DEFAULT 'local'",
        "CREATE INDEX conversations_by_user ON conversations (user_id, created_at)",
    ]),
    (3, [   # images of prompts, once per content hash (the prompts hold "sha256:<hash>")
        """CREATE TABLE images (
            hash TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL)""",
    ]),
]
IMAGE_REF = "sha256:"


class NotFoundError(UserError):
    """An id that does not exist, or belongs to another user (the two look the same)."""


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _map_image_urls(messages: list[dict], fn) -> list[dict]:
    """The messages with every image_url part's URL replaced by fn(URL)."""
    return [{**m, "content": [{"type": "image_url", "image_url": {"url": fn(p["image_url"]["url"])}}
                              if p.get("type") == "image_url" else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def _images_by_hash(messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The messages with every image URL replaced by "sha256:<its hash>", and {hash: URL}."""
    images = {}

    def ref(url: str) -> str:
        if url.startswith(IMAGE_REF):
            return url
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        images[digest] = url
        return IMAGE_REF + digest

    return _map_image_urls(messages, ref), images


def _canonical(messages: list[dict]) -> str:
    """The prompt as stored and compared: role/content (+ tool fields) in a fixed key order."""
    keep = ("role", "content", "name", "tool_calls", "tool_call_id")
    return json.dumps([{k: m[k] for k in keep if m.get(k) is not None} for m in messages],
                      sort_keys=True, ensure_ascii=False)


class FeedbackStore:
    """One connection guarded by a lock: the server writes from many tasks, rows are tiny."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        self._lock = threading.RLock()
        if self.url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError:
                raise UserError(f"feedback store {self.url.split('@')[-1]} is PostgreSQL but the psycopg "
                                 "package is not installed; pip install 'psycopg[binary]' or use a SQLite path") from None
            try:
                self._conn = psycopg.connect(self.url, autocommit=False)
            except psycopg.Error as e:
                raise UserError(f"cannot connect to the feedback database ({str(e).strip()}); "
                                "check the postgresql:// URL and that the server is running") from None
            self.kind = "postgresql"
        else:
            path = Path(self.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            _owner_only(path)
            try:
                self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError as e:
                raise UserError(f"feedback store {path} is not a usable SQLite database ({e}); "
                                "pass a new path or a postgresql:// URL") from None
            for extra in ("-wal", "-shm"):
                if Path(str(path) + extra).exists():
                    _owner_only(Path(str(path) + extra))
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self.kind = "sqlite"
        self.migrate()

    # ------------------------------------------------------------ plumbing

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.kind == "postgresql" else query

    def _execute(self, query: str, params=()) -> list[tuple]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute(self._sql(query), params)
            rows = cur.fetchall() if cur.description else []
            self._conn.commit()
            return rows

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            cur = self._conn.cursor()
            try:
                for query, params in statements:
                    cur.execute(self._sql(query), params)
                self._conn.commit()
            except Exception:
                self._conn.rollback()
                raise

    def schema_version(self) -> int:
        rows = self._execute("SELECT MAX(version) FROM schema_version")
        return rows[0][0] or 0

    def migrate(self) -> None:
        """Apply every migration newer than the database, each in its own transaction."""
        self._execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                      "applied_at DOUBLE PRECISION NOT NULL)")
        current = self.schema_version()
        newest = MIGRATIONS[-1][0]
        if current > newest:
            raise UserError(f"feedback store {self.url} has schema version {current}, newer than this "
                            f"llmforge understands ({newest}); upgrade llmforge")
        for version, statements in MIGRATIONS:
            if version > current:
                self._transaction([(s, ()) for s in statements] +
                                  [("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                                    (version, time.time()))])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------ writing

    def new_conversation(self, title: str = "", user: str = "local") -> str:
        cid = _new_id("conv")
        self._execute("INSERT INTO conversations (id, title, created_at, user_id) VALUES (?, ?, ?, ?)",
                      (cid, title[:200], time.time(), user))
        return cid

    def has_conversation(self, conversation_id: str, user: str | None = None) -> bool:
        if user is None:
            return bool(self._execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)))
        return bool(self._execute("SELECT 1 FROM conversations WHERE id = ? AND user_id = ?",
                                  (conversation_id, user)))

    def _require(self, table: str, row_id: str, what: str, user: str | None = None) -> tuple:
        if user is None:
            rows = self._execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
        elif table == "conversations":
            rows = self._execute("SELECT * FROM conversations WHERE id = ? AND user_id = ?", (row_id, user))
        else:   # generations: owned through their conversation
            rows = self._execute("SELECT g.* FROM generations g JOIN conversations c ON c.id = g.conversation_id "
                                 "WHERE g.id = ? AND c.user_id = ?", (row_id, user))
        if not rows:
            raise NotFoundError(f"unknown {what} '{row_id}'; use an id returned by the server")
        return rows[0]

    def log_generation(self, conversation_id: str, prompt: list[dict], content: str, model: str,
                       checkpoint: str, params: dict | None = None, finish_reason: str = "",
                       generation_id: str | None = None, user: str | None = None) -> str:
        """Record one answer to `prompt` (the messages before it). Continuing a conversation past
        a turn that had several regenerations marks the one it continued with as chosen."""
        self._require("conversations", conversation_id, "conversation", user)
        gid = generation_id or _new_id("gen")
        now = time.time()
        position = len(prompt)
        prompt, images = _images_by_hash(prompt)
        statements = [("INSERT INTO images (hash, url, created_at) VALUES (?, ?, ?) ON CONFLICT (hash) DO NOTHING",
                       (digest, url, now)) for digest, url in images.items()]
        statements += [
            ("INSERT INTO generations (id, conversation_id, position, prompt, content, model, checkpoint, "
             "params, finish_reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (gid, conversation_id, position, _canonical(prompt), content, model, checkpoint,
              json.dumps(params or {}, sort_keys=True), finish_reason, now)),
            # The conversation now reads: the prompt, then this answer (later turns are gone).
            ("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)),
        ]
        # Earlier assistant turns keep their link to the generation they came from.
        linked = {(r[0], r[1]): r[2] for r in self._execute(
            "SELECT position, content, generation_id FROM messages WHERE conversation_id = ?", (conversation_id,))}
        for i, m in enumerate(prompt):
            text = _text(m.get("content"))
            statements.append(("INSERT INTO messages (conversation_id, position, role, content, generation_id, "
                               "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                               (conversation_id, i, m.get("role", ""), text, linked.get((i, text)), now)))
        statements.append(("INSERT INTO messages (conversation_id, position, role, content, generation_id, "
                           "created_at) VALUES (?, ?, 'assistant', ?, ?, ?)",
                           (conversation_id, position, content, gid, now)))
        self._transaction(statements)
        self._choose_continued(conversation_id, prompt)
        return gid

    def with_images(self, messages: list[dict]) -> list[dict]:
        """Stored messages with each "sha256:<hash>" image reference replaced by the image's data URI."""
        def data(url: str) -> str:
            rows = self._execute("SELECT url FROM images WHERE hash = ?", (url[len(IMAGE_REF):],)) \
                if url.startswith(IMAGE_REF) else []
            return rows[0][0] if rows else url
        return _map_image_urls(messages, data)

    def _choose_continued(self, conversation_id: str, prompt: list[dict]) -> None:
        for position, m in enumerate(prompt):
            if m.get("role") != "assistant":
                continue
            rows = self._execute("SELECT id, content, chosen FROM generations WHERE conversation_id = ? "
                                 "AND position = ? ORDER BY created_at", (conversation_id, position))
            if len(rows) < 2 or any(r[2] for r in rows):
                continue
            text = _text(m.get("content"))
            kept = {r[0] for r in rows if r[1] == text}
            kept |= {e[0] for e in self._execute(
                "SELECT generation_id FROM edits WHERE content = ? AND generation_id IN "
                "(SELECT id FROM generations WHERE conversation_id = ? AND position = ?)",
                (text, conversation_id, position))}
            if len(kept) == 1:
                self.choose(kept.pop())

    def choose(self, generation_id: str, user: str | None = None) -> None:
        """The user picked this regeneration over the others at its turn."""
        row = self._require("generations", generation_id, "generation", user)
        conversation_id, position = row[1], row[2]
        self._transaction([
            ("UPDATE generations SET chosen = 0 WHERE conversation_id = ? AND position = ?",
             (conversation_id, position)),
            ("UPDATE generations SET chosen = 1 WHERE id = ?", (generation_id,)),
            ("UPDATE messages SET content = ?, generation_id = ? WHERE conversation_id = ? AND position = ?",
             (row[4], generation_id, conversation_id, position)),
        ])

    def edit(self, generation_id: str, content: str, kept: bool = True, user: str | None = None) -> str:
        """The user rewrote this answer; a kept edit replaces it in the conversation."""
        if not isinstance(content, str) or not content.strip():
            raise UserError("an edited answer must be non-empty text; send the rewritten answer as 'content'")
        row = self._require("generations", generation_id, "generation", user)
        eid = _new_id("edit")
        statements = [("INSERT INTO edits (id, generation_id, content, kept, created_at) VALUES (?, ?, ?, ?, ?)",
                       (eid, generation_id, content, int(kept), time.time()))]
        if kept:
            statements.append(("UPDATE messages SET content = ? WHERE conversation_id = ? AND position = ? "
                               "AND generation_id = ?", (content, row[1], row[2], generation_id)))
        self._transaction(statements)
        return eid

    def rate(self, generation_id: str, value: int, comment: str = "", user: str | None = None) -> str:
        """Thumbs up (+1) or down (-1); the latest rating of a generation is the one that counts."""
        if value not in (1, -1):
            raise UserError(f"rating must be 1 (thumbs up) or -1 (thumbs down), got {value!r}")
        self._require("generations", generation_id, "generation", user)
        rid = _new_id("rate")
        self._execute("INSERT INTO ratings (id, generation_id, value, comment, created_at) VALUES (?, ?, ?, ?, ?)",
                      (rid, generation_id, value, comment[:2000], time.time()))
        return rid

    # ------------------------------------------------------------ reading

    def conversations(self, limit: int = 100, user: str | None = None) -> list[dict]:
        if user is None:
            rows = self._execute("SELECT id, title, created_at FROM conversations ORDER BY created_at DESC LIMIT ?",
                                 (limit,))
        else:
            rows = self._execute("SELECT id, title, created_at FROM conversations WHERE user_id = ? "
                                 "ORDER BY created_at DESC LIMIT ?", (user, limit))
        return [{"id": r[0], "title": r[1], "created_at": r[2]} for r in rows]

    def conversation(self, conversation_id: str, user: str | None = None) -> dict:
        row = self._require("conversations", conversation_id, "conversation", user)
        msgs = self._execute("SELECT position, role, content, generation_id FROM messages "
                             "WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        return {"id": row[0], "title": row[1], "created_at": row[2],
                "messages": [{"role": r[1], "content": r[2], **({"generation_id": r[3]} if r[3] else {})}
                             for r in msgs]}

    def generation(self, generation_id: str, user: str | None = None) -> dict:
        r = self._require("generations", generation_id, "generation", user)
        edits = self._execute("SELECT content, kept FROM edits WHERE generation_id = ? ORDER BY created_at",
                              (generation_id,))
        ratings = self._execute("SELECT value FROM ratings WHERE generation_id = ? ORDER BY created_at",
                                (generation_id,))
        return {"id": r[0], "conversation_id": r[1], "position": r[2], "prompt": json.loads(r[3]),
                "content": r[4], "model": r[5], "checkpoint": r[6], "params": json.loads(r[7]),
                "finish_reason": r[8], "chosen": bool(r[9]), "created_at": r[10],
                "edits": [{"content": e[0], "kept": bool(e[1])} for e in edits],
                "rating": ratings[-1][0] if ratings else 0}

    def _generations(self) -> list[dict]:
        rows = self._execute("SELECT g.id, g.conversation_id, g.position, g.prompt, g.content, g.model, "
                             "g.checkpoint, g.chosen, c.user_id FROM generations g JOIN conversations c "
                             "ON c.id = g.conversation_id ORDER BY g.created_at")
        latest_rating = {r[0]: r[1] for r in self._execute(
            "SELECT generation_id, value FROM ratings ORDER BY created_at")}
        latest_kept_edit = {r[0]: r[1] for r in self._execute(
            "SELECT generation_id, content FROM edits WHERE kept = 1 ORDER BY created_at")}
        return [{"id": r[0], "conversation_id": r[1], "position": r[2], "prompt": r[3], "content": r[4],
                 "model": r[5], "checkpoint": r[6], "chosen": bool(r[7]), "user": r[8],
                 "rating": latest_rating.get(r[0], 0), "edit": latest_kept_edit.get(r[0])} for r in rows]


def _text(content) -> str:
    """OpenAI content may be a string or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _owner_only(path: Path) -> None:
    """Create (or tighten) a store file as owner-only: the tool sandbox runs as another user."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def open_store(url: str | Path) -> FeedbackStore:
    return FeedbackStore(url)


# ---------------------------------------------------------------- preference pairs

def preference_pairs(store: FeedbackStore, users: list[str] | None = None,
                     max_per_user: int | None = None) -> list[dict]:
    """Every pair the stored feedback implies, deduplicated, in a stable order. `users` keeps
    those users' pairs only; `max_per_user` keeps at most that many (the first) per user."""
    gens = store._generations()
    if users is not None:
        gens = [g for g in gens if g["user"] in set(users)]
    pairs: list[dict] = []

    def add(prompt: str, chosen: dict, rejected: dict, source: str, chosen_text: str | None = None):
        pairs.append({"prompt": store.with_images(json.loads(prompt)),
                      "chosen": chosen_text if chosen_text is not None else chosen["content"],
                      "rejected": rejected["content"], "source": source,
                      "model": rejected["model"], "checkpoint": rejected["checkpoint"], "user": rejected["user"],
                      "generation_ids": [chosen["id"], rejected["id"]]})

    # kept edit ≻ draft
    for g in gens:
        if g["edit"] is not None and g["edit"].strip() != g["content"].strip():
            add(g["prompt"], g, g, "edit", chosen_text=g["edit"])

    # thumbs up ≻ thumbs down, for the same prompt
    by_prompt = {}
    for g in gens:
        by_prompt.setdefault(g["prompt"], []).append(g)
    for prompt, group in by_prompt.items():
        ups = [g for g in group if g["rating"] > 0]
        downs = [g for g in group if g["rating"] < 0]
        for up, down in itertools.product(ups, downs):
            if up["content"].strip() != down["content"].strip():
                add(prompt, up, down, "rating")

    # chosen regeneration ≻ each discarded one (same turn, same prompt)
    by_turn = {}
    for g in gens:
        by_turn.setdefault((g["conversation_id"], g["position"], g["prompt"]), []).append(g)
    for (_, _, prompt), group in by_turn.items():
        for chosen in [g for g in group if g["chosen"]]:
            for other in group:
                if other is not chosen and other["content"].strip() != chosen["content"].strip():
                    add(prompt, chosen, other, "regeneration")

    seen, unique = set(), []
    for p in pairs:
        key = (json.dumps(p["prompt"], sort_keys=True), p["chosen"], p["rejected"])
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if max_per_user is not None:
        per_user: dict[str, int] = {}
        capped = []
        for p in unique:
            per_user[p["user"]] = per_user.get(p["user"], 0) + 1
            if per_user[p["user"]] <= max_per_user:
                capped.append(p)
        unique = capped
    return unique


def export_pairs(store: FeedbackStore | str | Path, out_path: str | Path, users: list[str] | None = None,
                 max_per_user: int | None = None) -> dict:
    """Write preference JSONL for the reward-model and DPO stages; return counts per source."""
    if not isinstance(store, FeedbackStore):
        if not str(store).startswith(("postgresql://", "postgres://")) and not Path(store).is_file():
            raise UserError(f"feedback store {store} does not exist; serve a model first "
                            "(`llmforge serve RUN_DIR`) or pass --db PATH")
        store = open_store(store)
    pairs = preference_pairs(store, users=users, max_per_user=max_per_user)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    counts = {"pairs": len(pairs)}
    for p in pairs:
        counts[p["source"]] = counts.get(p["source"], 0) + 1
    return counts


def export_cli(db: str | Path, out_path: str | Path, users: list[str] | None = None,
               max_per_user: int | None = None) -> None:
    """`llmforge feedback export --db DB --out prefs.jsonl [--user NAME ...] [--max-per-user N]`:
    write pairs, print a one-line summary."""
    if max_per_user is not None and max_per_user < 0:
        raise UserError(f"--max-per-user must be 0 or more, not {max_per_user}")
    counts = export_pairs(db, out_path, users=users, max_per_user=max_per_user)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "pairs") or "no feedback yet"
    print(f"wrote {counts['pairs']} preference pairs to {out_path} ({detail})")
