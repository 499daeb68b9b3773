"""Hugging Face transformers folders <-> llmforge checkpoints.

Our Transformer was written to match Llama's math exactly (RMSNorm, rotate-half RoPE, GQA,
SwiGLU, optional Qwen2 q/k/v biases), so converting is renaming tensors and translating the
config; no weight is permuted. tests/test_hf_parity.py holds transformers to that: logits
equal within 1e-4 (fp32) and greedy generations are identical, both directions.

    ours                          Hugging Face
    embed.weight                  model.embed_tokens.weight
    layers.N.attn.{q,k,v,o}_proj  model.layers.N.self_attn.{q,k,v,o}_proj
    layers.N.mlp.{gate,up,down}_proj  model.layers.N.mlp.{gate,up,down}_proj
    layers.N.input_norm           model.layers.N.input_layernorm
    layers.N.post_attn_norm       model.layers.N.post_attention_layernorm
    norm.weight                   model.norm.weight
    lm_head.weight                lm_head.weight   (absent when tie_word_embeddings)

Export writes LlamaForCausalLM, or Qwen2ForCausalLM when the model has q/k/v biases
(Llama's `attention_bias` would also put a bias on o_proj, which we do not have); a
mixture-of-experts model becomes MixtralForCausalLM or Qwen2MoeForCausalLM (interop/hf_moe.py).
Import reads Llama, Mistral, Qwen2, Mixtral and Qwen2-MoE folders: config.json, model.safetensors
or sharded model-*.safetensors + model.safetensors.index.json, tokenizer.json and the chat template.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.interop import hf_moe
from llmforge.run import replace_dir
from llmforge.tokenizer.chat import CHAT_TEMPLATE
from llmforge.train.checkpoint import (POLICY_KINDS, load_model, load_weights, model_config_from, read_config,
                                       resolve_checkpoint, save_checkpoint)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", *hf_moe.MOE_MODEL_TYPES)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}
CHAT_TOKENS = ["<|bos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>",
               "<|tool_call|>", "<|tool_result|>", "<|end|>"]


# ---------------------------------------------------------------- tensor names

_TOP_LEVEL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_IN_LAYER = {"attn.": "self_attn.", "mlp.": "mlp.", "input_norm.": "input_layernorm.",
             "post_attn_norm.": "post_attention_layernorm."}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str, arch: str = "llama") -> str:
    """The Hugging Face name of our tensor `name` in the `arch` (model_type) export."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _LAYER.match(name)
    if m:
        moe = hf_moe.to_hf(m.group(2), arch)
        if moe:
            return f"model.layers.{m.group(1)}.{moe}"
        for ours, theirs in _IN_LAYER.items():
            if m.group(2).startswith(ours):
                return f"model.layers.{m.group(1)}.{theirs}{m.group(2)[len(ours):]}"
    raise KeyError(name)


def from_hf_name(name: str, arch: str = "llama") -> str:
    """Our name for a Hugging Face tensor name of an `arch` model; KeyError for names we have no place for."""
    if not name.startswith(("model.", "lm_head.")):
        name = "model." + name  # folders saved from the bare LlamaModel lack the prefix
    for ours, theirs in _TOP_LEVEL.items():
        if name == theirs:
            return ours
    m = _HF_LAYER.match(name)
    if m:
        moe = hf_moe.from_hf(m.group(2), arch)
        if moe:
            return f"layers.{m.group(1)}.{moe}"
        for ours, theirs in _IN_LAYER.items():
            if m.group(2).startswith(theirs):
                return f"layers.{m.group(1)}.{ours}{m.group(2)[len(theirs):]}"
    raise KeyError(name)


# ---------------------------------------------------------------- export

def export_arch(cfg: ModelConfig) -> str:
    """The transformers model_type `cfg` exports as: llama, qwen2 (q/k/v biases), mixtral or qwen2_moe."""
    if cfg.moe_experts:
        return hf_moe.hf_arch(cfg)
    return "qwen2" if cfg.qkv_bias else "llama"


def hf_config(cfg: ModelConfig, *, bos_id, eos_id, pad_id, dtype: str = "float32") -> dict:
    """config.json of the LlamaForCausalLM (or Qwen2, Mixtral, Qwen2-MoE) equal to `cfg`."""
    arch = export_arch(cfg)
    out = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; v4, vLLM and llama.cpp's converter read rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if arch == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(hf_moe.hf_moe_config(cfg, arch))
    return out


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "f32": torch.float32, "f16": torch.float16}  # the GGUF spellings the CLI also uses
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def default_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only files; an export is meant to be shared like any file."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished export folder onto `out`, readable by everyone like any file."""
    default_permissions(tmp)
    replace_dir(tmp, out)


def _check_out(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier Hugging Face export: it may be
    user data, or the very checkpoint being exported."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder path for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    if "architectures" not in earlier or "kind" in earlier:
        raise UserError(f"--out {out} is a non-empty folder that is not an earlier export; "
                        "choose a new folder or empty it")


def special_ids(tokenizer_json: dict) -> dict[str, int]:
    """content -> id of the added (special) tokens of a tokenizer.json."""
    return {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}


def load_policy(ckpt, device="cpu"):
    """load_model() for exports and evaluation, also accepting a checkpoint the training loop saved
    from a LoRA-wrapped model (config.json "lora"): the adapters are merged into the weights."""
    folder = resolve_checkpoint(ckpt)
    config = read_config(folder)
    if not config.get("lora") or config.get("kind") not in POLICY_KINDS:
        return load_model(folder, kinds=POLICY_KINDS, device=device)
    from llmforge.model.lora import load_lora_checkpoint_into
    from llmforge.model.transformer import Transformer
    model = load_lora_checkpoint_into(Transformer(model_config_from(config)), load_weights(folder), config["lora"])
    return model.to(device), config, folder


def load_for_export(ckpt):
    """(merged policy, config.json, folder, tokenizer.json as a dict) of a checkpoint to export."""
    model, config, folder = load_policy(ckpt)
    for knob in ("qk_norm", "smear_layers"):
        if getattr(model.cfg, knob):
            raise UserError(f"checkpoint {folder} uses model.{knob}, which the Llama/Qwen2 exports cannot express; "
                            f"export a model trained without it")
    if model.cfg.moe_experts and model.cfg.moe_router != "token_choice":
        raise UserError(f"checkpoint {folder} routes by expert choice (model.moe_router), which Mixtral, Qwen2-MoE "
                        "and llama.cpp cannot express; export a model trained with moe_router=token_choice")
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"checkpoint {folder} has no tokenizer.json; copy the run's tokenizer/tokenizer.json "
                        "into it and export again")
    return model, config, folder, json.loads(tok_path.read_text(encoding="utf-8"))


def export_hf(ckpt, out, dtype: str = "fp32") -> Path:
    """Write checkpoint `ckpt` as a transformers folder `out` (written whole, then renamed)."""
    if dtype not in _DTYPES:
        raise UserError(f"unknown export dtype '{dtype}'; choose one of: {', '.join(_DTYPES)}")
    out = Path(out)
    _check_out(out)
    model, config, folder, tok_json = load_for_export(ckpt)
    vision = model if config.get("vision") else None   # written as LLaVA around the language model (llava.py)
    model = vision.trunk if vision else model
    cfg: ModelConfig = model.cfg
    carried = config.get("hf") or {}   # what an imported model brought with it
    tok_cfg, gen_cfg = _tokenizer_and_generation_config(config, carried, tok_json, cfg)
    template = config.get("chat_template") or CHAT_TEMPLATE

    torch_dtype = _DTYPES[dtype]
    arch = export_arch(cfg)
    weights = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers re-ties it to model.embed_tokens.weight
        weights[to_hf_name(name, arch)] = t.detach().to(torch_dtype).contiguous()
    hf_moe.export_tensors(weights, cfg, arch)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config_json = hf_config(cfg, bos_id=gen_cfg.get("bos_token_id"), eos_id=gen_cfg.get("eos_token_id"),
                                pad_id=gen_cfg.get("pad_token_id"), dtype=_DTYPE_NAMES[torch_dtype])
        if vision is not None:
            from llmforge.interop import llava
            weights, config_json = llava.llava_weights(vision, weights, torch_dtype), llava.llava_config(vision, config_json)
            gen_cfg = {**gen_cfg, "suppress_tokens": [vision.image_token_id]}
            _write_json(tmp / "preprocessor_config.json", llava.preprocessor_config(vision))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_json)
        _write_json(tmp / "generation_config.json", gen_cfg)
        shutil.copyfile(folder / "tokenizer.json", tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", {**tok_cfg, "chat_template": template})
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_and_generation_config(config: dict, carried: dict, tok_json: dict, cfg: ModelConfig):
    """tokenizer_config.json (minus chat_template) and generation_config.json for an export."""
    if carried.get("tokenizer_config") is not None:   # an imported model: give back what it came with
        tok_cfg = {k: v for k, v in carried["tokenizer_config"].items() if k != "chat_template"}
        gen = dict(carried.get("generation_config") or {})
        gen.setdefault("bos_token_id", carried.get("bos_token_id"))
        gen.setdefault("eos_token_id", carried.get("eos_token_id"))
        gen.setdefault("pad_token_id", carried.get("pad_token_id"))
        return tok_cfg, gen
    ids = special_ids(tok_json)
    missing = [t for t in ("<|bos|>", "<|eot|>", "<|end|>") if t not in ids]
    if missing:
        raise UserError(f"the checkpoint's tokenizer.json lacks the special tokens {missing}; "
                        "re-train the tokenizer with llmforge (it reserves them)")
    # a base model ends documents with <|eot|>; chat models end each turn with <|end|>
    eos = "<|eot|>" if config.get("kind") == "base" else "<|end|>"
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": eos,
        "pad_token": "<|eot|>",
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
        # the key transformers 4 and 5 both read (5's "extra_special_tokens" is a dict in 4)
        "additional_special_tokens": [t for t in CHAT_TOKENS if t in ids and t not in ("<|bos|>", "<|eot|>", eos)],
    }
    gen = {"bos_token_id": ids["<|bos|>"], "eos_token_id": [ids["<|end|>"], ids["<|eot|>"]],
           "pad_token_id": ids["<|eot|>"], "do_sample": False}
    return tok_cfg, gen


# ---------------------------------------------------------------- import

def model_config_from_hf(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json; UserError for anything we cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(hf.get("architectures") or []) or "?"
        raise UserError(f"unsupported architecture '{model_type}' ({arch}); llmforge imports "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} models")

    def need(key):
        if key not in hf:
            raise UserError(f"config.json has no '{key}'; this is not a complete {model_type} config")
        return hf[key]

    d_model, n_head = need("hidden_size"), need("num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_head
    if hf.get("head_dim") not in (None, d_model // n_head):
        raise UserError(f"config.json head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads="
                        f"{d_model // n_head}; llmforge's model derives head_dim and cannot import this model")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json hidden_act='{hf['hidden_act']}' is not supported; llmforge's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise UserError("config.json mlp_bias=true is not supported; llmforge's MLP has no biases")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise UserError("config.json attention_bias=true (biases on q/k/v AND o_proj) is not supported; "
                        "llmforge supports Qwen2-style q/k/v biases only")
    rope_theta = _rope_theta(hf)
    n_ctx = need("max_position_embeddings")
    window = _sliding_window(hf, model_type)
    if window is not None and window < n_ctx:
        # within `window` tokens sliding-window attention IS full causal attention, so
        # capping the context keeps the model exact instead of refusing it
        warnings.warn(f"config.json sliding_window={window}: context capped at {window} tokens, where "
                      "full attention equals sliding-window attention (llmforge has no sliding window)")
        n_ctx = window
    if max_seq_len:
        n_ctx = min(n_ctx, max_seq_len)
    fields = dict(
        vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_head=n_head, n_kv_head=n_kv,
        d_model=d_model, d_ff=need("intermediate_size"), max_seq_len=n_ctx, rope_theta=float(rope_theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or model_type == "qwen2_moe" and bool(hf.get("qkv_bias", True)),
        init_std=float(hf.get("initializer_range", 0.02)))
    if model_type in hf_moe.MOE_MODEL_TYPES:
        fields.update(hf_moe.config_from_hf(hf, need))
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _rope_theta(hf: dict) -> float:
    if hf.get("rope_scaling"):  # transformers 4 spelling
        kind = hf["rope_scaling"].get("rope_type") or hf["rope_scaling"].get("type")
        raise UserError(f"config.json rope_scaling (type '{kind}') is not supported: llmforge implements plain "
                        "RoPE only; import a model without RoPE scaling")
    params = hf.get("rope_parameters") or {}
    if params and "rope_type" not in params and "rope_theta" not in params:
        raise UserError("config.json rope_parameters per layer type is not supported; llmforge implements "
                        "one plain RoPE for all layers")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"config.json rope_parameters.rope_type='{kind}' (RoPE scaling) is not supported: "
                        "llmforge implements plain RoPE only; import a model without RoPE scaling")
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json partial_rotary_factor is not supported; llmforge rotates the whole head")
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def _sliding_window(hf: dict, model_type: str) -> int | None:
    if model_type in ("qwen2", "qwen2_moe") and not hf.get("use_sliding_window", False):
        return None
    layer_types = hf.get("layer_types")
    if layer_types and all(t == "full_attention" for t in layer_types):
        return None
    return hf.get("sliding_window")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, or the shards its index.json lists."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e}); re-download or re-save the model") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pth")):
        raise UserError(f"{hf_dir} holds pickle weights (*.bin), which llmforge does not load (unsafe); save the "
                        "model with safetensors first: model.save_pretrained(dir, safe_serialization=True)")
    else:
        raise UserError(f"{hf_dir} has no model.safetensors nor model.safetensors.index.json; "
                        "pass a Hugging Face model folder")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise UserError(f"shard {path} listed in model.safetensors.index.json is missing; download all shards")
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} cannot be read ({e}); the file is corrupt, download it again") from None
    return weights


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download the model files") from None


def _chat_template_of(hf_dir: Path, tok_cfg: dict) -> str | None:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is what chat uses
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (hf_dir / "chat_template.json").is_file():
        template = _read_json(hf_dir / "chat_template.json").get("chat_template")
    return template


def import_hf(hf_dir, out, *, dtype: str = "auto", max_seq_len: int | None = None,
              add_chat_tokens: bool = True) -> Path:
    """Convert a local Hugging Face Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE folder into a llmforge
    "base" checkpoint.

    dtype: "auto" keeps the stored precision (bf16 stays bf16; models load into fp32 anyway),
    or fp32 / bf16 / fp16. max_seq_len caps the context (the RoPE table and KV cache are sized
    by it). add_chat_tokens adds llmforge's chat special tokens (<|user|>, <|end|>, ...) the
    tokenizer lacks, with embeddings initialised to the mean embedding (Hewitt, 2021), so the
    imported model can go through SFT / RM / RL in llmforge's chat format; logits of the
    original vocabulary are unchanged. With `out` = RUN/ckpt/base, RUN/tokenizer/tokenizer.json
    is written too (or checked, if RUN has one), so `llmforge sft --out RUN` trains the import."""
    import tokenizers

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder; pass a local Hugging Face model folder")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model folder (no config.json); pass the folder "
                        "that holds config.json and the *.safetensors files")
    if dtype != "auto" and dtype not in _DTYPES:
        raise UserError(f"unknown import dtype '{dtype}'; choose auto or one of: {', '.join(_DTYPES)}")
    hf = _read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf, max_seq_len)
    tok_file = hf_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json (the fast-tokenizer file llmforge needs); save it with "
                        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) and import again")
    try:
        hf_tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{tok_file} cannot be loaded by `tokenizers` ({e}); re-download it") from None
    tok_cfg = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    gen_cfg = _read_json(hf_dir / "generation_config.json") if (hf_dir / "generation_config.json").is_file() else {}

    weights = _rename_and_check(read_hf_weights(hf_dir), cfg, hf_dir, hf["model_type"])
    if dtype != "auto":
        weights = {k: v.to(_DTYPES[dtype]) for k, v in weights.items()}
    added = []
    if add_chat_tokens:
        added = [t for t in CHAT_TOKENS if hf_tok.token_to_id(t) is None]
        if added:
            hf_tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added])
            cfg = _grow_vocab(weights, cfg, hf_tok.get_vocab_size(with_added_tokens=True))

    tokenizer = _wrap_tokenizer(hf_tok)
    run_tokenizer = _run_tokenizer_path(Path(out), tokenizer)
    model = _model_from_weights(weights, cfg)
    meta = {
        "stage": "import",
        "source": str(hf_dir.resolve()),
        "chat_template": _chat_template_of(hf_dir, tok_cfg),
        "added_chat_tokens": added,
        "hf": {"model_type": hf["model_type"], "tokenizer_config": tok_cfg, "generation_config": gen_cfg,
               "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id"),
               "pad_token_id": hf.get("pad_token_id")},
    }
    folder = save_checkpoint(out, model, kind="base", model_cfg=cfg, tokenizer=tokenizer, meta=meta)
    if run_tokenizer is not None:
        run_tokenizer.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "tokenizer.json", run_tokenizer.with_suffix(".json.tmp"))
        os.replace(run_tokenizer.with_suffix(".json.tmp"), run_tokenizer)
    return folder


def _run_tokenizer_path(out: Path, tokenizer) -> Path | None:
    """Importing into RUN/ckpt/base makes RUN a run directory the later stages (sft, rm, rl) can use:
    its tokenizer/tokenizer.json must be the imported one. Returns the path to write, or None."""
    if out.parent.name != "ckpt":
        return None
    path = out.parent.parent / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return path
    from llmforge.tokenizer.bpe import Tokenizer
    if Tokenizer.load(path).hash != tokenizer.hash:
        raise UserError(f"{path} is a different tokenizer than the imported model's; import into a new run "
                        f"directory (--out NEWRUN/ckpt/base) so the run's data and model agree")
    return None


def _rename_and_check(hf_weights: dict, cfg: ModelConfig, hf_dir: Path, model_type: str) -> dict[str, torch.Tensor]:
    from llmforge.model.transformer import Transformer

    hf_moe.import_tensors(hf_weights, model_type, hf_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    weights = {}
    for name, t in hf_weights.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old exports saved; recomputed from rope_theta
            continue
        try:
            ours = from_hf_name(name, model_type)
        except KeyError:
            raise UserError(f"{hf_dir}: tensor '{name}' has no counterpart in llmforge's Llama model; "
                            "this checkpoint is not a plain Llama/Mistral/Qwen2 model") from None
        if ours not in expected:
            raise UserError(f"{hf_dir}: tensor '{name}' does not fit this config (no '{ours}' in the model); "
                            "check config.json (e.g. num_hidden_layers) against the weights")
        if tuple(t.shape) != expected[ours]:
            raise UserError(f"{hf_dir}: tensor '{name}' has shape {tuple(t.shape)} but config.json implies "
                            f"{expected[ours]}; the weights do not match config.json")
        weights[ours] = t
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    expected_names = set(expected) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing = sorted(expected_names - set(weights))
    if missing:
        raise UserError(f"{hf_dir}: tensors missing for {missing[:3]} ({len(missing)} in all); "
                        "the folder holds incomplete weights (a missing shard?)")
    return weights


def _grow_vocab(weights: dict, cfg: ModelConfig, n_tokens: int) -> ModelConfig:
    """Give new token ids embedding (and untied output) rows equal to the mean row."""
    extra = n_tokens - cfg.vocab_size
    if extra <= 0:  # the tokenizer already fits in the (padded) embedding matrix
        return cfg
    for name in ("embed.weight", "lm_head.weight"):
        if name in weights:
            w = weights[name]
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            weights[name] = torch.cat([w, mean.expand(extra, -1)], dim=0)
    return dataclasses.replace(cfg, vocab_size=n_tokens)


def _model_from_weights(weights: dict, cfg: ModelConfig):
    """A Transformer holding `weights` without first allocating random ones (models can be large)."""
    from llmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    state = dict(weights)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced the shared Parameter
    return model


class _RawTokenizer:
    """Stand-in with the two things save_checkpoint needs, when llmforge.tokenizer.bpe is absent."""

    def __init__(self, hf_tok):
        self.hf = hf_tok

    def save(self, path) -> None:
        self.hf.save(str(path))

    @property
    def hash(self) -> str:
        import hashlib
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()[:16]


def _wrap_tokenizer(hf_tok):
    try:
        from llmforge.tokenizer.bpe import Tokenizer
    except ImportError:
        return _RawTokenizer(hf_tok)
    return Tokenizer.from_hf(hf_tok)
