"""GGUF export read back with gguf's own reader: every tensor's name, shape and values, the
metadata llama.cpp needs, the tokenizer, and the Q/K permutation (attention scores computed with
llama.cpp's adjacent-pair RoPE on the GGUF tensors equal ours); then, where the llama-cpp-cffi
wheel is installed, real llama.cpp: our logits, our tokenisation and our greedy chat answers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.interop import export_checkpoint
from llmforge.interop.gguf_export import gguf_tensor_name, permute_for_llama_cpp, unpermute_from_llama_cpp
from llmforge.model.transformer import Transformer, apply_rope
from llmforge.train.checkpoint import save_checkpoint



VOCAB = 290


@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.tokenizer.bpe import Tokenizer
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 30
    return Tokenizer.train(texts, vocab_size=VOCAB)


def make_checkpoint(tmp_path, tokenizer, **model_args):
    # the model has more embedding rows than tokens, as padded vocabularies do
    cfg = ModelConfig(vocab_size=VOCAB + 6, n_layer=2, d_model=64, max_seq_len=64, rope_theta=1000.0, **model_args)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))  # norms and biases away from 1 / 0
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=cfg, tokenizer=tokenizer)
    return model.eval(), cfg


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("variant", ["llama-tied-gqa", "qwen2-bias"])
def test_gguf_read_back_matches_checkpoint(variant, dtype, tokenizer, tmp_path):
    if variant == "llama-tied-gqa":
        model, cfg = make_checkpoint(tmp_path, tokenizer, n_head=4, n_kv_head=2, tie_embeddings=True)
    else:
        model, cfg = make_checkpoint(tmp_path, tokenizer, n_head=4, n_kv_head=1, tie_embeddings=False,
                                     qkv_bias=True)
    arch = "qwen2" if cfg.qkv_bias else "llama"
    path = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "out", dtype=dtype)
    assert path.name == f"model-{dtype}.gguf"
    reader = gguf.GGUFReader(path)

    # metadata llama.cpp reads
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == cfg.n_layer
    assert field(reader, f"{arch}.embedding_length") == cfg.d_model
    assert field(reader, f"{arch}.feed_forward_length") == cfg.ffn_dim
    assert field(reader, f"{arch}.attention.head_count") == cfg.n_head
    assert field(reader, f"{arch}.attention.head_count_kv") == cfg.n_kv_head
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, f"{arch}.context_length") == cfg.max_seq_len
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)

    # tokenizer: every id's string, types, merges, specials, chat template
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert [tokens[i] for i in range(tokenizer.vocab_size)] == [tokenizer.hf.id_to_token(i)
                                                               for i in range(tokenizer.vocab_size)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.token_id("<|end|>")] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.token_id("<|end|>")
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert "<|assistant|>" in field(reader, "tokenizer.chat_template")

    # tensors: names, shapes, values
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {gguf_tensor_name(k) for k in state}
    for ours_name, ours in state.items():
        t = by_name[gguf_tensor_name(ours_name)]
        data = torch.from_numpy(np.array(t.data)).float()
        assert tuple(data.shape) == tuple(ours.shape), ours_name
        assert list(t.shape) == list(reversed(ours.shape))  # ggml's ne order
        expect = ours
        if arch == "llama" and ".attn.q_proj." in ours_name:
            expect = permute_for_llama_cpp(ours, cfg.n_head)
        elif arch == "llama" and ".attn.k_proj." in ours_name:
            expect = permute_for_llama_cpp(ours, cfg.n_kv_head)
        if dtype == "f16" and ours.dim() == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert torch.allclose(data, expect, rtol=1e-3, atol=1e-4), ours_name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(data, expect), ours_name


def adjacent_pair_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's 'normal' RoPE: rotate (x[2i], x[2i+1]) by position * theta^(-2i/d). x: (H, T, d)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = angles.cos().float(), angles.sin().float()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_permuted_q_k_give_our_attention_scores_under_llama_cpp_rope(tokenizer, tmp_path):
    model, cfg = make_checkpoint(tmp_path, tokenizer, n_head=4, n_kv_head=2, tie_embeddings=True)
    path = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    assert path == tmp_path / "m.gguf"
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(path).tensors}
    ids = torch.randint(8, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    attn, T, D = model.layers[0].attn, ids.shape[1], cfg.head_dim
    with torch.no_grad():
        h = model.layers[0].input_norm(model.embed(ids))[0]  # (T, d_model)
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        q = apply_rope(attn.q_proj(h).view(T, cfg.n_head, D).transpose(0, 1), cos, sin)
        k = apply_rope(attn.k_proj(h).view(T, cfg.n_kv_head, D).transpose(0, 1), cos, sin)
        ours = q @ k.repeat_interleave(cfg.n_head // cfg.n_kv_head, 0).transpose(1, 2)

        q2 = adjacent_pair_rope((h @ tensors["blk.0.attn_q.weight"].T).view(T, cfg.n_head, D).transpose(0, 1),
                                cfg.rope_theta)
        k2 = adjacent_pair_rope((h @ tensors["blk.0.attn_k.weight"].T).view(T, cfg.n_kv_head, D).transpose(0, 1),
                                cfg.rope_theta)
        theirs = q2 @ k2.repeat_interleave(cfg.n_head // cfg.n_kv_head, 0).transpose(1, 2)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # without the permutation, llama.cpp's RoPE would give other scores: the check can fail
    with torch.no_grad():
        q3 = adjacent_pair_rope(attn.q_proj(h).view(T, cfg.n_head, D).transpose(0, 1), cfg.rope_theta)
        k3 = adjacent_pair_rope(attn.k_proj(h).view(T, cfg.n_kv_head, D).transpose(0, 1), cfg.rope_theta)
        unpermuted = q3 @ k3.repeat_interleave(cfg.n_head // cfg.n_kv_head, 0).transpose(1, 2)
    assert not torch.allclose(ours, unpermuted, atol=1e-2)
    w = attn.q_proj.weight.detach()
    assert torch.equal(unpermute_from_llama_cpp(permute_for_llama_cpp(w, 4), 4), w)


def test_gguf_export_errors(tokenizer, tmp_path):
    make_checkpoint(tmp_path, tokenizer, n_head=4, n_kv_head=2)
    with pytest.raises(UserError, match="unknown GGUF dtype"):
        export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "out", dtype="q4")
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gguf_of_an_imported_model_keeps_its_special_ids(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmforge.interop import import_hf
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=3, eos_token_id=5)
    d = tmp_path / "hf"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    tokenizer.save(d / "tokenizer.json")
    import_hf(d, tmp_path / "ckpt")
    path = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "q.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 3 and field(reader, "tokenizer.ggml.eos_token_id") == 5
    assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}


class LlamaCpp:
    """Real llama.cpp through its C API (llmforge/interop/llama_cpp.py loads it); f32 KV cache
    (no f16 rounding); a fresh context per call."""

    def __init__(self, shim_dir):
        from llmforge.interop.llama_cpp import load_library
        try:
            self.ffi, self.lib = load_library(shim_dir)
        except RuntimeError as e:
            pytest.skip(str(e))

    def load(self, path):
        params = self.lib.llama_model_default_params()
        model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        assert model != self.ffi.NULL, f"llama.cpp could not load {path}"
        return model

    def tokenize(self, model, text: str) -> list[int]:
        vocab, raw = self.lib.llama_model_get_vocab(model), text.encode()
        out = self.ffi.new("int32_t[]", len(raw) + 8)
        n = self.lib.llama_tokenize(vocab, raw, len(raw), out, len(raw) + 8, False, False)
        assert n >= 0
        return list(out[0:n])

    def logits(self, model, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) logits of one forward over `ids`."""
        cp = self.lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = cp.type_v = 0   # GGML_TYPE_F32
        ctx = self.lib.llama_init_from_model(model, cp)
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            for i, t in enumerate(ids):   # every position's logits, sequence 0
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            assert self.lib.llama_decode(ctx, batch) == 0
            n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(model))
            rows = [self.lib.llama_get_logits_ith(ctx, i) for i in range(len(ids))]
            assert all(r != self.ffi.NULL for r in rows)
            return np.array([list(r[0:n_vocab]) for r in rows])
        finally:
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(ctx)

    def greedy(self, model, ids: list[int], n: int, stop: int) -> list[int]:
        out = []
        for _ in range(n):
            t = int(self.logits(model, ids + out)[-1].argmax())
            out.append(t)
            if t == stop:
                break
        return out


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    return LlamaCpp(tmp_path_factory.mktemp("llama-cpp-shim"))


def test_llama_cpp_runs_the_export_with_our_logits(tokenizer, tmp_path, llama_cpp):
    """The real consumer: llama.cpp loads the f32 file and computes our logits (f32 KV cache)."""
    for variant in ({"n_kv_head": 2, "tie_embeddings": True},
                    {"n_kv_head": 1, "tie_embeddings": False, "qkv_bias": True}):
        model, cfg = make_checkpoint(tmp_path / str(len(variant)), tokenizer, n_head=4, **variant)
        path = export_checkpoint(tmp_path / str(len(variant)) / "ckpt", "gguf", tmp_path / f"{len(variant)}.gguf",
                                 dtype="f32")
        llm = llama_cpp.load(path)
        text = "def add(a, b):\n    return a + b  # the quick brown fox"
        assert llama_cpp.tokenize(llm, text) == tokenizer.encode(text)
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        theirs = torch.tensor(llama_cpp.logits(llm, ids)[:, :cfg.vocab_size], dtype=torch.float32)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        assert torch.allclose(theirs, ours, atol=2e-4, rtol=0), (theirs - ours).abs().max()
        llama_cpp.lib.llama_model_free(llm)


@pytest.mark.parametrize("preset", [{"single_digits": True}, {"single_digits": False}])
def test_llama_cpp_tokenises_like_us_and_gives_our_greedy_chat_answers(tmp_path, llama_cpp, preset):
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.tokenizer.bpe import Tokenizer
    from llmforge.tokenizer.chat import render_prompt

    texts = SPLIT_TEXTS + ["def add(a, b):\n    return a + b\n", "What is 45 + 38? It is 83. 1234567"] * 20
    tok = Tokenizer.train(texts, vocab_size=400, **preset)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64,
                      init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=cfg, tokenizer=tok)
    llm = llama_cpp.load(export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32"))
    for text in SPLIT_TEXTS:
        assert llama_cpp.tokenize(llm, text) == tok.encode(text), text
    end = tok.token_id("<|end|>")
    engine = Engine(model, tok, max_batch=1)
    for question in ("What is 45 + 38?", "def add(a, b):", "naïve café 東京"):
        prompt = render_prompt(tok, [{"role": "user", "content": question}])
        ours = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[end]))[0]
        assert llama_cpp.greedy(llm, prompt, 12, end) == ours.tokens, question
    llama_cpp.lib.llama_model_free(llm)


SPLIT_TEXTS = ["What is 45 + 38?", "12345678 and 3.14159, -7 and 1,000,000", "def add(a, b):\n    return a + b\n",
               "  leading   spaces\n\n\ttabs\r\nand CRLF", "I'm sure they'll say we've done it, didn't we? OK'D",
               "naïve café — 東京 2024年 ümlaut Ωμέγα", "x=[1,2,3]; y = {'k': \"v\"}  # comment!!\n\n\n",
               "emoji 🙂🙂 and math ∑ x² ≤ 10", "a\u00a0b\u2003c", "    \n  \n x"]


@pytest.mark.parametrize("preset,expected", [({"single_digits": False}, "llama-bpe"),
                                             ({"single_digits": True}, "qwen2"),
                                             ({"single_digits": False, "whole_numbers": True}, "llama-bpe")])
def test_gguf_pre_tokenizer_is_the_llama_cpp_regex_that_splits_like_ours(tmp_path, preset, expected):
    """The name written must select, in llama.cpp, a regex that splits text exactly as our
    tokenizer does (llama.cpp cannot run our regex, only its named ones). The regex llama.cpp
    uses for that name is run with the `regex` package, so this holds without llama.cpp; with it,
    test_llama_cpp_tokenises_like_us_and_gives_our_greedy_chat_answers checks the real thing."""
    regex = pytest.importorskip("regex")
    from tokenizers import Regex, pre_tokenizers

    from llmforge.interop.gguf_export import LLAMA_CPP_PRE_REGEX
    from llmforge.tokenizer.bpe import Tokenizer, split_pattern

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox 123 jumps 4567."] * 30
    tok = Tokenizer.train(texts, vocab_size=1500 if preset.get("whole_numbers") else VOCAB, **preset)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=32)
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg), kind="sft", model_cfg=cfg, tokenizer=tok)
    path = export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    assert field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == expected
    ours = pre_tokenizers.Split(Regex(split_pattern(single_digits=preset["single_digits"])), behavior="isolated")
    theirs = regex.compile(LLAMA_CPP_PRE_REGEX[expected])
    for text in SPLIT_TEXTS:
        assert [p for p, _ in ours.pre_tokenize_str(text)] == theirs.findall(text), text
