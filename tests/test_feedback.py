"""Feedback store: a scripted session of drafts, edits, regenerations and ratings exports
exactly the preference pairs it implies."""
import importlib.util
import json
import os
import sqlite3

import pytest

from llmforge.errors import UserError
from llmforge.serve.feedback import MIGRATIONS, export_pairs, open_store

MODEL, CKPT = "tiny-sft", "runs/t/ckpt/sft"
# e.g. postgresql://llmforge:llmforge@127.0.0.1/feedback (the test drops and recreates its tables)
POSTGRES_URL = os.environ.get("LLMFORGE_TEST_POSTGRES_URL", "")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def scripted_session(store):
    """Three conversations a user might have with the web chat."""
    q = [user("What is 2+2?")]
    # 1) a wrong draft the user edits, keeps, and continues from
    c1 = store.new_conversation("math")
    a = store.log_generation(c1, q, "5", MODEL, CKPT)
    store.edit(a, "4")
    store.rate(a, -1)
    b = store.log_generation(c1, q + [assistant("4"), user("and 3+3?")], "6", MODEL, CKPT)
    store.rate(b, +1)
    # 2) the same question elsewhere, answered right and rated up
    c2 = store.new_conversation("math again")
    c = store.log_generation(c2, q, "2+2 is 4.", MODEL, CKPT)
    store.rate(c, +1)
    # 3) a regeneration: the user regenerates once and continues with the second answer
    c3 = store.new_conversation("geo")
    r = [user("Capital of France?")]
    e = store.log_generation(c3, r, "fish", MODEL, CKPT)
    f = store.log_generation(c3, r, "Paris.", MODEL, CKPT)
    store.log_generation(c3, r + [assistant("Paris."), user("thanks")], "You're welcome.", MODEL, CKPT)
    return dict(a=a, b=b, c=c, e=e, f=f, c1=c1, c3=c3)


def test_scripted_session_exports_the_expected_pairs(tmp_path):
    store = open_store(tmp_path / "fb.sqlite")
    ids = scripted_session(store)
    out = tmp_path / "prefs" / "feedback.jsonl"
    counts = export_pairs(store, out)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(p["source"], p["chosen"], p["rejected"]) for p in pairs}
    assert got == {
        ("edit", "4", "5"),                     # kept edit ≻ draft
        ("rating", "2+2 is 4.", "5"),           # up ≻ down for the same prompt, across conversations
        ("regeneration", "Paris.", "fish"),     # chosen regeneration ≻ discarded
    }
    assert counts == {"pairs": 3, "edit": 1, "rating": 1, "regeneration": 1}
    for p in pairs:
        assert p["prompt"] and all(set(m) >= {"role", "content"} for m in p["prompt"])
        assert p["prompt"][-1]["role"] == "user"
        assert p["model"] == MODEL and p["checkpoint"] == CKPT
    edit_pair = next(p for p in pairs if p["source"] == "edit")
    assert edit_pair["prompt"] == [user("What is 2+2?")]
    assert store.generation(ids["f"])["chosen"] and not store.generation(ids["e"])["chosen"]


def test_conversation_reads_as_kept(tmp_path):
    store = open_store(tmp_path / "fb.sqlite")
    ids = scripted_session(store)
    conv = store.conversation(ids["c1"])
    assert [m["content"] for m in conv["messages"]] == ["What is 2+2?", "4", "and 3+3?", "6"]
    assert conv["messages"][1]["generation_id"] == ids["a"]   # the edited turn stays linked to its draft
    g = store.generation(ids["a"])
    assert g["content"] == "5" and g["edits"] == [{"content": "4", "kept": True}] and g["rating"] == -1
    assert g["model"] == MODEL and g["checkpoint"] == CKPT


def test_explicit_choice_and_unkept_edit(tmp_path):
    store = open_store(tmp_path / "fb.sqlite")
    c = store.new_conversation()
    p = [user("hi")]
    g1 = store.log_generation(c, p, "hello", MODEL, CKPT)
    g2 = store.log_generation(c, p, "go away", MODEL, CKPT)
    store.choose(g1)
    store.edit(g2, "a draft the user threw away", kept=False)
    pairs = [json.loads(line) for line in _export(store, tmp_path)]
    assert [(x["source"], x["chosen"], x["rejected"]) for x in pairs] == [("regeneration", "hello", "go away")]
    assert store.conversation(c)["messages"][-1]["content"] == "hello"


def _export(store, tmp_path):
    out = tmp_path / "p.jsonl"
    export_pairs(store, out)
    return out.read_text().splitlines()


def test_sqlite_is_wal_with_versioned_schema_and_reopens(tmp_path):
    path = tmp_path / "fb.sqlite"
    store = open_store(path)
    scripted_session(store)
    store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == MIGRATIONS[-1][0]
    raw.close()
    again = open_store(path)                         # migrations are not re-applied
    assert again.schema_version() == MIGRATIONS[-1][0]
    assert len(again.conversations()) == 3


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "fb.sqlite"
    open_store(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO schema_version VALUES (999, 0)")
    raw.commit()
    raw.close()
    with pytest.raises(UserError, match="upgrade llmforge"):
        open_store(path)


def test_bad_input_is_a_user_error_and_leaves_no_file(tmp_path):
    store = open_store(tmp_path / "fb.sqlite")
    with pytest.raises(UserError, match="unknown generation"):
        store.rate("gen-nope", 1)
    c = store.new_conversation()
    g = store.log_generation(c, [user("x")], "y", MODEL, CKPT)
    with pytest.raises(UserError, match="rating must be"):
        store.rate(g, 5)
    with pytest.raises(UserError, match="non-empty"):
        store.edit(g, "  ")
    with pytest.raises(UserError, match="unknown conversation"):
        store.log_generation("conv-nope", [user("x")], "y", MODEL, CKPT)
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match="does not exist"):
        export_pairs(tmp_path / "missing.sqlite", out)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg is installed")
def test_postgres_url_without_psycopg_says_how_to_fix():
    with pytest.raises(UserError, match="psycopg"):
        open_store("postgresql://user@localhost/feedback")


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is None, reason="pip install 'psycopg[binary]'")
def test_unreachable_postgres_is_a_user_error():
    with pytest.raises(UserError, match="cannot connect"):
        open_store("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


@pytest.mark.skipif(not POSTGRES_URL, reason="set LLMFORGE_TEST_POSTGRES_URL to a scratch PostgreSQL database")
def test_postgres_store_exports_the_same_pairs(tmp_path):
    import psycopg
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS images, ratings, edits, generations, messages, conversations, schema_version CASCADE")
    store = open_store(POSTGRES_URL)
    assert store.kind == "postgresql" and store.schema_version() == MIGRATIONS[-1][0]
    ids = scripted_session(store)
    counts = export_pairs(store, tmp_path / "pg.jsonl")
    assert counts == {"pairs": 3, "edit": 1, "rating": 1, "regeneration": 1}
    assert store.conversation(ids["c1"])["messages"][1]["content"] == "4"
    store.close()
    assert open_store(POSTGRES_URL).schema_version() == MIGRATIONS[-1][0]   # reopening does not re-migrate


def test_cli_export_filters_and_caps_by_user(tmp_path, capsys):
    from llmforge.cli import main

    db = tmp_path / "fb.sqlite"
    store = open_store(db)
    for name, drafts in (("alice", 3), ("bob", 1)):
        c = store.new_conversation(user=name)
        for k in range(drafts):
            g = store.log_generation(c, [user(f"q{k}")], "draft", MODEL, CKPT, user=name)
            store.edit(g, f"{name}'s fix {k}", user=name)
    store.close()
    out = tmp_path / "prefs.jsonl"

    def exported(*flags):
        assert main(["feedback", "export", "--db", str(db), "--out", str(out), *flags]) == 0
        return [json.loads(line)["user"] for line in out.read_text().splitlines()]

    assert sorted(exported()) == ["alice"] * 3 + ["bob"]
    assert exported("--user", "bob") == ["bob"]
    assert sorted(exported("--user", "bob", "--user", "alice", "--max-per-user", "1")) == ["alice", "bob"]
    assert "wrote 2 preference pairs" in capsys.readouterr().out
    assert main(["feedback", "export", "--db", str(db), "--out", str(out), "--max-per-user", "-1"]) == 2
    assert "--max-per-user must be 0 or more" in capsys.readouterr().err
