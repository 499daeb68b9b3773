"""The web chat in a real browser: Playwright drives Debian's headless Chromium to send a
message, edit the streamed answer, rate it, regenerate, and the test reads the rows back from
the feedback database. Skips cleanly where Playwright or Chromium is missing.

Setup (never `playwright install`; it downloads browsers):
    apt-get install -y chromium && pip install playwright
"""
import shutil
import sqlite3
import time

import pytest

from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.tiny import make_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _serve(model, db):
    server = load_served(model, cfg=ServeConfig(batch_wait_ms=0), db=str(db))
    url, stop = run_in_thread(create_app(server))
    yield url, db, server
    stop()
    server.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=512)
    yield from _serve(run, run / "feedback.sqlite")


@pytest.fixture(scope="module")
def page(site):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_send_edit_rate_regenerate_reaches_the_database(site, page):
    url, db, server = site
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector(f"text=model: {server.model_name}")
    page.fill("#max-tokens", "12")
    page.fill("[data-testid=input]", "Hello, who are you?")
    page.click("[data-testid=send]")
    # the stream finishes when the rating buttons become enabled (they need the generation id)
    page.wait_for_selector("[data-testid=msg-assistant] [data-testid=thumbs-up]:not([disabled])")
    assert page.inner_text("[data-testid=msg-user] [data-testid=content]") == "Hello, who are you?"
    page.wait_for_selector("[data-testid=conversations] li")   # the sidebar reloads on its own, after the stream
    assert page.locator("[data-testid=conversations] li").count() == 1

    page.click("[data-testid=edit]")
    page.fill("[data-testid=edit-box]", "I am a tiny test model.")
    page.click("[data-testid=save-edit]")
    page.wait_for_selector("[data-testid=msg-assistant] .edited")
    assert page.inner_text("[data-testid=msg-assistant] [data-testid=content]") == "I am a tiny test model."
    page.click("[data-testid=thumbs-up]")
    page.wait_for_selector("[data-testid=thumbs-up].on")

    page.click("[data-testid=regenerate]")
    page.wait_for_selector("[data-testid=variant-label]:has-text('2/2')")
    page.wait_for_selector("[data-testid=msg-assistant] [data-testid=thumbs-down]:not([disabled])")
    page.click("[data-testid=thumbs-down]")
    page.wait_for_selector("[data-testid=thumbs-down].on")
    assert not errors and page.inner_text("[data-testid=error]") == ""

    con = sqlite3.connect(db)
    gens = con.execute("SELECT id, content, model, checkpoint FROM generations ORDER BY created_at").fetchall()
    assert len(gens) == 2 and all(g[2] == server.model_name and g[3] == server.checkpoint_id for g in gens)
    edit = con.execute("SELECT generation_id, content, kept FROM edits").fetchall()
    assert edit == [(gens[0][0], "I am a tiny test model.", 1)]
    ratings = dict(con.execute("SELECT generation_id, value FROM ratings").fetchall())
    assert ratings == {gens[0][0]: 1, gens[1][0]: -1}
    prompt = con.execute("SELECT prompt FROM generations").fetchone()[0]
    assert "Hello, who are you?" in prompt
    con.close()


def test_stop_button_cancels_the_stream(site, page, monkeypatch):
    url, _, server = site
    real_step = server.engine.step

    def slow_step():   # a slow model, so the answer is still streaming when Stop is pressed
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    before = server.engine.stats.generated_tokens
    page.goto(url + "/")
    page.wait_for_selector(f"text=model: {server.model_name}")
    page.fill("#temperature", "0")      # greedy: this random model then never stops early
    page.fill("#max-tokens", "400")
    page.fill("[data-testid=input]", "Tell me a long story.")
    page.click("[data-testid=send]")
    page.wait_for_selector("[data-testid=stop]:visible")
    deadline = time.time() + 10
    while time.time() < deadline and server.engine.stats.generated_tokens - before < 5:
        time.sleep(0.02)
    page.click("[data-testid=stop]")
    page.wait_for_selector("[data-testid=send]:visible")
    deadline = time.time() + 10
    while time.time() < deadline and server.engine.has_work():
        time.sleep(0.05)
    assert not server.engine.has_work() and server.engine.stats.generated_tokens - before < 300
    # a stopped answer is not recorded, so it cannot be rated
    assert page.locator("[data-testid=msg-assistant] [data-testid=thumbs-up][disabled]").count() == 1


# ------------------------------------------------------------------ keys, tenancy, long chats

ALICE, BOB = "sk-alice-web-0123", "sk-bob-web-0123"


@pytest.fixture(scope="module")
def keyed_site(tmp_path_factory):
    """A server with two API keys and a small context (96 tokens), so a chat overflows quickly."""
    run = tmp_path_factory.mktemp("keyed")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=96)
    server = load_served(run, cfg=ServeConfig(batch_wait_ms=0), db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server, api_keys=f"alice={ALICE},bob={BOB}"))
    yield url, server
    stop()
    server.close()


def _use_key(page, url, key):
    page.goto(url + "/")
    page.fill("[data-testid=api-key]", key)
    page.click("[data-testid=use-key]")


def test_web_chat_with_a_key_shows_only_its_own_conversations_and_trims_long_chats(keyed_site, page):
    url, server = keyed_site
    page.goto(url + "/")
    page.wait_for_selector("[data-testid=error]:has-text('API key')")   # no key yet: said in words
    _use_key(page, url, ALICE)
    page.wait_for_selector(f"text=model: {server.model_name}")
    page.fill("#temperature", "0")
    for i, text in enumerate(["first question about foxes and dogs", "second question, a bit longer than that",
                              "third question, which pushes the history out of the context"]):
        page.fill("[data-testid=input]", text)
        page.click("[data-testid=send]")   # max tokens stays at its default 128 > the 96-token context
        page.wait_for_selector(f"[data-testid=msg-assistant] >> nth={i} >> [data-testid=thumbs-up]:not([disabled])")
    assert page.inner_text("[data-testid=error]") == ""
    assert page.locator("[data-testid=trimmed]").count() >= 1          # the oldest turns, greyed out
    assert "limited to" in page.inner_text("[data-testid=notice]")
    assert page.locator("[data-testid=conversations] li").count() == 1
    # bob, in the same browser, sees none of alice's conversations
    _use_key(page, url, BOB)
    page.wait_for_selector(f"text=model: {server.model_name}")
    page.wait_for_timeout(300)
    assert page.locator("[data-testid=conversations] li").count() == 0
    assert len(server.store.conversations(user="alice")) == 1 and server.store.conversations(user="bob") == []


@pytest.fixture(scope="module")
def vision_site(tmp_path_factory):
    run = tmp_path_factory.mktemp("vrun")
    yield from _serve(make_tiny_checkpoint(run / "ckpt" / "vision", vision=True), run / "feedback.sqlite")


def test_web_chat_attaches_an_image_and_the_store_keeps_it(vision_site, page, tmp_path):
    from PIL import Image
    url, db, server = vision_site
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector(f"text=model: {server.model_name}")
    page.fill("#max-tokens", "4")
    page.set_input_files("[data-testid=image]", str(tmp_path / "red.png"))
    page.wait_for_selector("[data-testid=pending-image]:not([hidden])")
    page.fill("[data-testid=input]", "What colour is this?")
    page.click("[data-testid=send]")
    page.wait_for_selector("[data-testid=msg-assistant] [data-testid=thumbs-up]:not([disabled])")
    assert page.locator("[data-testid=msg-user] [data-testid=attached-image]").count() == 1
    assert not errors and page.inner_text("[data-testid=error]") == ""
    con = sqlite3.connect(db)
    prompt = con.execute("SELECT prompt FROM generations").fetchone()[0]
    (digest, stored), = con.execute("SELECT hash, url FROM images").fetchall()
    con.close()
    assert f"sha256:{digest}" in prompt and stored.startswith("data:image/png;base64,")
