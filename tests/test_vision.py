"""Vision: the image tower and projector, the <|image|> placeholder and its loss mask, text-only
bit-identity, the engine with images, the visual tasks' split and verifiers, image input errors,
the server's image requests and 400s, the feedback store's images, and a micro vision stage."""
import base64
import dataclasses
import io
import json

import httpx
import pytest
import torch
from openai import OpenAI
from PIL import Image

from llmforge.config import ModelConfig, ServeConfig, resolve
from llmforge.data.images import data_uri, load_image, to_pixels
from llmforge.errors import UserError
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.interop import export_checkpoint
from llmforge.model.transformer import Transformer
from llmforge.model.vision import VisionEncoder, VisionLanguageModel, VisionTowerConfig
from llmforge.run import RunDir
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.feedback import export_pairs, open_store
from llmforge.serve.tiny import make_tiny_checkpoint
from llmforge.stages import vision
from llmforge.tasks import TASKS
from llmforge.tasks.user_data import load_image_conversations
from llmforge.tasks.vision import VISION_TASKS, ask, get_vision_task
from llmforge.tokenizer.bpe import Tokenizer
from llmforge.tokenizer.chat import render, render_prompt, render_text
from llmforge.train.checkpoint import load_model, load_tokenizer, load_weights, save_checkpoint

TOWER = VisionTowerConfig(image_size=16, patch_size=4, width=32, n_layer=1, n_head=2)


def vlm(seed=0, vocab=97):
    torch.manual_seed(seed)
    trunk = Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=96))
    return VisionLanguageModel(trunk, TOWER).eval()


def test_patch_embedding_and_projector_shapes():
    pixels = torch.randn(3, 3, 16, 16)
    assert VisionEncoder(TOWER)(pixels).shape == (3, 16, 32)          # (16 / 4)^2 patches of width 32
    model = vlm()
    assert model.image_tokens == 16 and model.image_token_id == 97     # the first id past the vocabulary
    assert model.encode_images(pixels).shape == (3 * 16, 32)           # k embeddings per image, d_model wide


def test_placeholder_expands_to_k_positions_and_the_loss_skips_them(tmp_path):
    tok = load_tokenizer(make_tiny_checkpoint(tmp_path / "t"))
    messages = ask("What is it?") + [{"role": "assistant", "content": "A dog."}]
    ids, mask = render(tok, messages, image_tokens=5, image_id=999)
    assert ids.count(999) == 5 and all(m == 0 for i, m in zip(ids, mask) if i == 999)
    with pytest.raises(UserError, match="text-only"):
        render(tok, messages)                                          # a text-only caller
    model = vlm()
    idx = torch.tensor([[1, 2] + [97] * 16 + [3, 4, 5, 6]])
    targets = torch.tensor([[2] + [97] * 16 + [3, 4, 5, 6, 7]])
    images = torch.randn(1, 3, 16, 16)
    _, loss = model(idx, targets=targets, loss_mask=torch.ones(1, 22), images=images)
    assert torch.isfinite(loss)
    # a loss mask of all ones still leaves out every position that is or predicts a placeholder
    keep = (targets != 97) & (idx != 97)
    assert int(keep.sum()) == 22 - 17
    logits = model(idx, images=images)
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_text_only_is_bit_identical_to_the_language_model():
    model = vlm()
    idx = torch.randint(0, 97, (2, 20))
    assert torch.equal(model(idx), model.trunk(idx))
    assert torch.equal(model.trunk.hidden_states(idx, embeds=model.trunk.embed(idx)), model.trunk.hidden_states(idx))
    assert not torch.allclose(model.trunk.hidden_states(idx, embeds=model.trunk.embed(idx) + 1), model.trunk.hidden_states(idx))
    with pytest.raises(ValueError, match="image embeddings"):
        model.hidden_states(torch.tensor([[1, 97, 2]]))


def test_engine_batches_image_and_text_requests_like_one_at_a_time(no_text):
    model, tok = vlm(1), no_text
    prompts = [[1] + [97] * 16 + [5, 6], [2, 3, 4], [7] + [97] * 16 + [8]]
    images = [torch.randn(1, 3, 16, 16), None, torch.randn(1, 3, 16, 16)]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    together = Engine(model, tok, max_batch=4).generate(prompts, params, images=images)
    alone = [Engine(model, tok, max_batch=1).generate([p], params, images=[im])[0] for p, im in zip(prompts, images)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    other = Engine(model, tok, max_batch=1).generate([prompts[0]], params, images=[torch.randn(1, 3, 16, 16)])[0]
    assert other.tokens != together[0].tokens or other.logprobs != together[0].logprobs   # the image matters
    bad = Engine(model, tok, max_batch=4).generate(prompts, params, images=[images[0], None, torch.randn(1, 3, 8, 8)])
    assert bad[2].finish_reason == "error"                           # its tower pass fails: it ends alone,
    assert [c.tokens for c in bad[:2]] == [c.tokens for c in alone[:2]]   # admitted with it, the others don't notice
    with pytest.raises(ValueError, match="image positions"):
        Engine(model, tok).add(prompts[0], params, images=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Engine(model, tok).add(prompts[0], params)                    # placeholders without their image
    with pytest.raises(ValueError, match="text-only"):
        Engine(model.trunk, tok).add(prompts[1], params, images=images[0])


def test_train_and_heldout_images_are_disjoint_by_seed_and_hash():
    for name, task in VISION_TASKS.items():
        train, held = task.train_items(300), task.heldout_items(100)
        assert {i.image_hash for i in train}.isdisjoint({i.image_hash for i in held}), name
        assert max(i.seed for i in train) < min(i.seed for i in held)
        assert len({i.image_hash for i in held}) == len(held)           # held-out images are distinct
    digits = get_vision_task("digits")
    scans = lambda items: {i.meta["scan"] for i in items}                # noqa: E731
    assert scans(digits.train_items(1000)).isdisjoint(scans(digits.heldout_items(300)))


def test_verifiers_grade_hand_made_answers():
    def grade(name, reference, text):
        item = get_vision_task(name).train_items(1)[0]
        item.reference = reference
        return get_vision_task(name).verify(item, [{"role": "assistant", "content": text}])
    assert grade("digits", 7, "7") == 1 and grade("digits", 7, "It is 1, not 7") == 0 and grade("digits", 7, "") == 0
    assert grade("count", 3, "There are 3 shapes.") == 1 and grade("count", 3, "4") == 0
    assert grade("color", "blue", "It is blue.") == 1 and grade("color", "blue", "red, not blue") == 0
    assert grade("shape", "circle", "a circle") == 1 and grade("shape", "circle", "square") == 0
    assert grade("read", "fox", "Fox.") == 1 and grade("read", "fox", "the word is fox") == 0
    assert grade("bars", 2, "Bar 2.") == 1 and grade("bars", 2, "3") == 0


def _png(img, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_images_are_refused_with_one_clear_line(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    assert to_pixels(load_image(data_uri(img)), 16).shape == (3, 16, 16)
    assert to_pixels(img, 16).min() >= -1 and to_pixels(img, 16).max() <= 1
    (tmp_path / "big.png").write_bytes(_png(Image.new("1", (8000, 6500))))   # 52 megapixels, small file
    (tmp_path / "a.tiff").write_bytes(_png(img, "TIFF"))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    cases = {"http://example.com/a.png": "not fetched", "data:image/png;base64,@@@": "base64 is corrupt",
             str(tmp_path / "missing.png"): "does not exist", str(tmp_path / "big.png"): "megapixels",
             str(tmp_path / "a.tiff"): "format TIFF", str(tmp_path / "junk.png"): "not an image"}
    for url, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_image(url, "here")


def test_user_jsonl_with_a_missing_image_names_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    line = lambda path: json.dumps({"messages": [                          # noqa: E731
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}},
                                     {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "Black."}]})
    data = tmp_path / "imgs.jsonl"
    data.write_text(line("ok.png") + "\n" + line("gone.png") + "\n")
    with pytest.raises(UserError, match=r"imgs.jsonl:2: image file .*gone.png does not exist"):
        load_image_conversations(data)
    data.write_text(line("ok.png") + "\n")
    (messages, images), = load_image_conversations(data)
    assert images[0].size == (8, 8)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    out = {}
    for name, with_vision in (("text", False), ("vision", True)):
        folder = make_tiny_checkpoint(tmp_path_factory.mktemp(name) / "ckpt" / name, vision=with_vision)
        server = load_served(folder, cfg=ServeConfig(max_batch=4, batch_wait_ms=5),
                             db=str(folder.parent / "feedback.sqlite"))
        url, stop = run_in_thread(create_app(server))
        out[name] = (server, url, stop)
    yield out
    for server, _, stop in out.values():
        stop()
        server.close()


def _image_message(url, text="What colour is this?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_served_image_answer_and_its_400s(servers):
    server, url, _ = servers["vision"]
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    red = data_uri(Image.new("RGB", (32, 32), (220, 30, 30)))
    r = client.chat.completions.create(model=server.model_name, messages=_image_message(red), max_tokens=5,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > server.image_tokens
    text_only = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
    assert text_only.choices[0].message.content is not None
    bad = {"data:image/png;base64," + base64.b64encode(b"garbage").decode(): "not an image",
           "https://example.com/cat.png": "not fetched"}
    for image_url, message in bad.items():
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={"model": server.model_name, "messages": _image_message(image_url)})
        assert resp.status_code == 400 and message in resp.json()["error"]["message"]
        assert resp.json()["error"]["code"] == "invalid_image"
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}}] * 80}]
    resp = httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": many}, timeout=30)
    assert resp.status_code == 400 and "fewer images" in resp.json()["error"]["message"]
    text_server, text_url, _ = servers["text"]
    resp = httpx.post(text_url + "/v1/chat/completions", timeout=30,
                      json={"model": text_server.model_name, "messages": _image_message(red)})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "image_input_not_supported"
    assert "text-only" in resp.json()["error"]["message"]
    ok = httpx.post(text_url + "/v1/chat/completions", timeout=30,
                    json={"model": text_server.model_name, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2})
    assert ok.status_code == 200                                        # still serving the others


def test_feedback_store_keeps_images_by_hash(tmp_path):
    store = open_store(tmp_path / "fb.sqlite")
    conv = store.new_conversation()
    red = data_uri(Image.new("RGB", (4, 4), (255, 0, 0)))
    prompt = _image_message(red)
    gen = store.log_generation(conv, prompt, "blue", model="m", checkpoint="c")
    store.log_generation(conv, prompt, "red", model="m", checkpoint="c")
    stored = store.generation(gen)["prompt"][0]["content"][1]["image_url"]["url"]
    assert stored.startswith("sha256:") and len(store._execute("SELECT hash FROM images")) == 1
    store.rate(gen, -1)
    store.edit(gen, "red")
    export_pairs(store, tmp_path / "pairs.jsonl")
    pair = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["prompt"][0]["content"][1]["image_url"]["url"] == red   # the image comes back with the pair


@pytest.mark.slow
def test_micro_vision_stage_beats_the_no_image_baseline(tmp_path):

    cfg = resolve("micro")
    run = RunDir(tmp_path / "run").create()
    texts = [render_text(i.conversation) for t in TASKS.values() for i in t.train_items(50)]
    texts += [" ".join(["red green blue yellow purple circle square triangle"] * 20)] * 20
    tok = Tokenizer.train(texts, vocab_size=400)
    tok.save(run.tokenizer)
    cfg.model.vocab_size = 448
    torch.manual_seed(0)
    save_checkpoint(run.ckpt("sft"), Transformer(cfg.model), kind="sft", model_cfg=cfg.model, tokenizer=tok)
    for key, value in dict(tasks="color,shape", examples_per_task=400, align_max_steps=30, max_steps=200,
                           lr=3e-3, lm_lr_scale=1.0, eval_per_task=40, text_eval_per_task=2, text_examples_per_task=20,
                           seq_len=64, log_every=10, tower_steps=60, tower_batch=32).items():
        setattr(cfg.vision, key, value)
    # the language model here is random, not an SFT model, so what the text share teaches it leaks
    # into its colour answers: with all 9 text tasks, colour fell 0.575 -> 0.325 when the letter and
    # sort tasks began to answer through the Python tool, and with chat, safety and JSON it fell to
    # 0.35 when JSON items began to name made-up people (safety alone: 0.32); safety and multiply
    # (answers that share no words with a colour): 0.70 against 0.25 for the blank image; when the
    # safety requests changed again (so did the tokenizer trained on all tasks' text), 0.325 at 120
    # steps and 0.825 at 200 against 0.2 blank: the stage runs 200 steps here
    cfg.tasks.names = "safety,multiply_tool"
    out = vision.run(cfg, run, show_progress=False)
    losses = [r["loss"] for r in run.read_metrics() if r["stage"] == "vision_tune" and "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    # colour is learned in these steps (shape, at 30%, is not yet): well above chance and the blank image
    assert out["accuracy"]["color"]["accuracy"] > max(0.2, out["blank_image"]["color"]["accuracy"]) + 0.2, out
    assert (run.plots / "vision_samples.png").is_file() and (run.root / "vision.json").is_file()
    # stage 0 ran: the encoder alone tells colours apart on held-out images after 60 steps (chance 20%)
    assert out["tower"]["probe_accuracy"]["color"] > 0.6, out["tower"]
    assert (run.ckpt("vision_tower") / "model.safetensors").is_file()
    # ... and its encoder went into stages 1 and 2 frozen (vision.freeze_tower): the same weights at the end
    tower, final = load_weights(run.ckpt("vision_tower")), load_weights(run.ckpt("vision"))
    encoder = [k for k in tower if k.startswith("encoder.")]
    assert encoder and all(torch.equal(tower[k], final[k]) for k in encoder)


def test_hf_llava_export_matches_logits_and_greedy_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")

    folder = make_tiny_checkpoint(tmp_path / "ckpt" / "vision", vision=True)
    ours, _, _ = load_model(folder)
    for p in ours.parameters():                       # random, non-trivial weights everywhere
        p.data.normal_(0, 0.3)
    save_checkpoint(folder, ours, kind="vision", model_cfg=ours.cfg, tokenizer=load_tokenizer(folder),
                    meta={"vision": dataclasses.asdict(ours.tower)})
    out = export_checkpoint(folder, "hf", tmp_path / "hf")
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    tok = load_tokenizer(folder)
    ids = render_prompt(tok, ask("What colour is it?"), ours.image_tokens, ours.image_token_id)
    pixels = to_pixels(Image.new("RGB", (16, 16), (200, 40, 40)), 16)[None]
    with torch.no_grad():
        mine = ours(torch.tensor([ids]), images=pixels)
        hf = theirs(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    V = ours.cfg.vocab_size
    assert hf.shape[-1] == V + 1 and (mine - hf[..., :V]).abs().max() < 1e-4
    engine = Engine(ours, tok, max_batch=1)
    greedy = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.0), images=[pixels])[0].tokens
    gen = theirs.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8, do_sample=False,
                          eos_token_id=None, min_new_tokens=8)
    assert gen[0, len(ids):].tolist()[:len(greedy)] == greedy
