"""Hugging Face export/import: transformers is an independent reference implementation of our
model, so matching its logits (fp32, 1e-4) and greedy tokens checks RoPE layout, GQA, norms,
biases and tying, in both directions. Every model here is tiny, random and built by the test."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.interop import export_checkpoint, import_hf
from llmforge.interop.hf import CHAT_TOKENS
from llmforge.tokenizer.chat import CHAT_TEMPLATE
from llmforge.model.transformer import Transformer
from llmforge.train.checkpoint import load_model, save_checkpoint



VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.tokenizer.bpe import Tokenizer
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3,
             "import os\nprint(os.getcwd())\n", "Hello world! 12345 + 678 = 13023"] * 20
    return Tokenizer.train(texts, vocab_size=VOCAB)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, norms and biases included (ones/zeros would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tokens(n: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(8, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def our_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    ids = ids.clone()
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0].tolist()


def hf_greedy(hf_model, ids: torch.Tensor, n: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None  # random models: do not stop early
    hf_model.generation_config.pad_token_id = 0
    out = hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0].tolist()


EXPORT_CASES = {
    "tied-gqa": dict(tie_embeddings=True, n_head=4, n_kv_head=2, qkv_bias=False),
    "untied-mha": dict(tie_embeddings=False, n_head=4, n_kv_head=4, qkv_bias=False),
    "qwen2-bias-gqa": dict(tie_embeddings=False, n_head=4, n_kv_head=1, qkv_bias=True),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers(case, tokenizer, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, d_model=64, max_seq_len=64, rope_theta=500.0,
                      norm_eps=1e-6, **EXPORT_CASES[case])
    model = Transformer(cfg)
    randomize(model, seed=1)
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=cfg, tokenizer=tokenizer)
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= files
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected_arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected_arch

    ids = tokens(40, seed=2)
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = hf_model(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
        expected = hf_greedy(hf_model, ids[:1, :10], 12)
        assert our_greedy(model, ids[:1, :10], 12) == expected
    # the generation engine (KV cache, batched slots) gives the same greedy tokens
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    prompts = [ids[0, :10].tolist(), ids[1, :7].tolist()]
    outs = Engine(model, tokenizer, max_batch=2).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert prompts[0] + outs[0].tokens == expected
    assert prompts[1] + outs[1].tokens == hf_greedy(hf_model, ids[1:2, :7], 12)


def test_exported_tokenizer_and_chat_template(tokenizer, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32)
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg), kind="sft", model_cfg=cfg, tokenizer=tokenizer)
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def add(a, b): return a + b"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token == "<|end|>" and hf_tok.bos_token == "<|bos|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.token_id("<|end|>") in gen["eos_token_id"]

    chat = pytest.importorskip("llmforge.tokenizer.chat")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3? Use the calculator."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": '{"expr":"2+3"}'}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5. ünïcode <b>ok</b>"},
        {"role": "user", "content": "Thanks"},
    ]
    for add_prompt in (False, True):
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
        assert rendered == chat.render_text(messages, add_generation_prompt=add_prompt)
    # arguments given as an object (the transformers convention) render the same
    messages[2]["tool_calls"][0]["function"]["arguments"] = {"expr": "2+3"}
    assert hf_tok.apply_chat_template(messages, tokenize=False) == chat.render_text(messages)
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_export_refuses_reward_model_and_foreign_folder(tokenizer, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32)
    save_checkpoint(tmp_path / "rm", Transformer(cfg), kind="rm", model_cfg=cfg, tokenizer=tokenizer)
    with pytest.raises(UserError, match="'rm' checkpoint"):
        export_checkpoint(tmp_path / "rm", "hf", tmp_path / "out")
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg), kind="base", model_cfg=cfg, tokenizer=tokenizer)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="non-empty folder"):
        export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="non-empty folder"):  # never over the checkpoint itself
        export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")  # an earlier export is replaced
    with pytest.raises(UserError, match="unknown export format"):
        export_checkpoint(tmp_path / "ckpt", "onnx", tmp_path / "out")


@pytest.mark.parametrize("knob", [{"qk_norm": True}, {"smear_layers": 1}])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_refuses_what_llama_cannot_express(knob, fmt, tokenizer, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32, **knob)
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg), kind="base", model_cfg=cfg, tokenizer=tokenizer)
    with pytest.raises(UserError, match=f"uses model.{next(iter(knob))}"):
        export_checkpoint(tmp_path / "ckpt", fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- import

def hf_model_dir(tmp_path, tokenizer, model_type: str, *, tied: bool, n_kv: int, shard: bool = False,
                 **extra):
    """Save a random transformers model of `model_type` + our tokenizer as a local HF folder."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_theta=300.0, **extra)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config_cls(**common)).eval()
    randomize(hf_model, seed=3)
    if tied:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    d = tmp_path / f"hf-{model_type}"
    hf_model.save_pretrained(d, max_shard_size="60KB" if shard else "10GB")
    tokenizer.save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>",
         "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"}))
    return d, hf_model


IMPORT_CASES = {
    "llama-tied-gqa": dict(model_type="llama", tied=True, n_kv=2),
    "llama-untied-mha-sharded": dict(model_type="llama", tied=False, n_kv=4, shard=True),
    "mistral-gqa": dict(model_type="mistral", tied=False, n_kv=1, sliding_window=None),
    "qwen2-bias-tied": dict(model_type="qwen2", tied=True, n_kv=2),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(case, tokenizer, tmp_path):
    d, hf_model = hf_model_dir(tmp_path, tokenizer, **IMPORT_CASES[case])
    if IMPORT_CASES[case].get("shard"):
        assert (d / "model.safetensors.index.json").is_file()
    ckpt = import_hf(d, tmp_path / "ckpt")
    model, config, _ = load_model(ckpt)
    assert config["kind"] == "base"
    assert model.cfg.qkv_bias == (IMPORT_CASES[case]["model_type"] == "qwen2")
    assert model.cfg.tie_embeddings == IMPORT_CASES[case]["tied"]
    assert config["chat_template"].startswith("{% for m in messages %}")
    ids = tokens(40, seed=4)
    with torch.no_grad():
        ours, theirs = model.eval()(ids), hf_model(ids).logits
        # our chat tokens already exist in this tokenizer: the vocabulary is unchanged
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
        assert our_greedy(model, ids[:1, :10], 12) == hf_greedy(hf_model, ids[:1, :10], 12)


def test_import_then_export_round_trips(tokenizer, tmp_path):
    d, hf_model = hf_model_dir(tmp_path, tokenizer, "qwen2", tied=False, n_kv=2)
    import_hf(d, tmp_path / "ckpt")
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = tokens(20, seed=5)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=0)
    # the imported chat template and tokenizer settings travel back out
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"].startswith("{% for m in messages %}") and tok_cfg["eos_token"] == "<|end|>"


def test_import_adds_chat_tokens_to_foreign_tokenizer(tmp_path):
    """A tokenizer without llmforge's specials gets them, with mean embeddings; old logits unchanged."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["hello world foo bar baz"] * 10,
                           trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    n_old = tk.get_vocab_size()
    cfg = transformers.LlamaConfig(vocab_size=n_old, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "foreign"
    hf_model.save_pretrained(d)
    tk.save(str(d / "tokenizer.json"))
    ckpt = import_hf(d, tmp_path / "run" / "ckpt" / "base")
    model, config, _ = load_model(ckpt)
    assert config["added_chat_tokens"] == CHAT_TOKENS
    assert model.cfg.vocab_size == n_old + len(CHAT_TOKENS)
    from llmforge.tokenizer.bpe import Tokenizer
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    assert tok.token_id("<|end|>") >= n_old
    ids = torch.randint(0, n_old, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids)[..., :n_old], hf_model(ids).logits, atol=1e-4, rtol=0)
        new_row = model.embed.weight[tok.token_id("<|user|>")]
        assert torch.allclose(new_row, hf_model.model.embed_tokens.weight.mean(0), atol=1e-6)

    # the run directory is ready for `llmforge sft`: its tokenizer is the import's, chats render
    from llmforge.run import RunDir
    from llmforge.train.checkpoint import load_run_checkpoint, load_run_tokenizer
    from llmforge.tokenizer.chat import render
    run = RunDir(tmp_path / "run")
    run_tok = load_run_tokenizer(run)
    load_run_checkpoint(run, "base", ("base",), run_tok, "import it first")
    ids, mask = render(run_tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    assert ids[0] == run_tok.bos_id and run_tok.token_id("<|end|>") in ids and sum(mask) > 0
    # a run whose tokenizer is another one is refused before anything is written
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    Tokenizer.train(["something else entirely"] * 5, vocab_size=280).save(other / "tokenizer" / "tokenizer.json")
    with pytest.raises(UserError, match="different tokenizer"):
        import_hf(d, other / "ckpt" / "base")
    assert not (other / "ckpt").exists()


def test_import_errors(tokenizer, tmp_path):
    d, _ = hf_model_dir(tmp_path, tokenizer, "llama", tied=True, n_kv=2)
    out = tmp_path / "ckpt"

    original = json.loads((d / "config.json").read_text())

    def config_with(**changes):  # the saved config with `changes` (None deletes a key)
        cfg = {**original, **changes}
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))

    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path, out)
    config_with(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        import_hf(d, out)
    config_with(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(UserError, match="rope_parameters.rope_type='llama3'"):
        import_hf(d, out)
    config_with(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(UserError, match="rope_scaling"):
        import_hf(d, out)
    config_with(num_hidden_layers=3)
    with pytest.raises(UserError, match="missing"):
        import_hf(d, out)
    config_with(intermediate_size=128)
    with pytest.raises(UserError, match="shape"):
        import_hf(d, out)
    config_with()
    (d / "model.safetensors").rename(d / "model.bin")
    with pytest.raises(UserError, match="pickle"):
        import_hf(d, out)
    (d / "model.bin").rename(d / "model.safetensors")
    (d / "tokenizer.json").rename(d / "tok.bak")
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_hf(d, out)
    assert not out.exists()  # nothing half-written
    (d / "tok.bak").rename(d / "tokenizer.json")
    import_hf(d, out)  # the restored folder imports fine


def test_mistral_sliding_window_caps_context(tokenizer, tmp_path):
    d, hf_model = hf_model_dir(tmp_path, tokenizer, "mistral", tied=False, n_kv=2, sliding_window=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = import_hf(d, tmp_path / "ckpt")
    assert any("sliding_window=16" in str(w.message) for w in caught)
    model, _, _ = load_model(ckpt)
    assert model.cfg.max_seq_len == 16
    ids = tokens(16, seed=6)  # within the window, full attention is exact
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


def test_export_of_a_lora_checkpoint_merges_the_adapters(tokenizer, tmp_path):
    from llmforge.model.lora import add_lora, lora_meta
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)
    model = add_lora(Transformer(cfg), rank=4, alpha=8, targets="q_proj,v_proj,up_proj")
    randomize(model, seed=7)  # adapters included, as if trained
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=cfg, tokenizer=tokenizer,
                    meta={"lora": lora_meta(model)})
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = tokens(24, seed=8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


def test_import_keeps_bf16_weights_bf16(tokenizer, tmp_path):
    from safetensors import safe_open
    d, hf_model = hf_model_dir(tmp_path, tokenizer, "llama", tied=False, n_kv=2)
    hf_model = hf_model.to(torch.bfloat16)
    hf_model.save_pretrained(d)
    ckpt = import_hf(d, tmp_path / "ckpt")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # half the disk
    model, _, _ = load_model(ckpt)
    # the reference: transformers loading the bf16 folder into fp32 (a bf16-cast model's own
    # RoPE inv_freq buffer would be rounded to bf16 too)
    reference = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = tokens(20, seed=9)
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), reference(ids).logits, atol=1e-4, rtol=0)
    fp32 = import_hf(d, tmp_path / "ckpt32", dtype="fp32")
    with safe_open(str(fp32 / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
