"""Export a checkpoint as GGUF (llama.cpp, Ollama, LM Studio) with the `gguf` package.

Architecture: "llama", or "qwen2" when the model has q/k/v biases (llama.cpp's qwen2 graph
reads them). Tensors: f16 matrices with f32 norms and biases (dtype="f16", llama.cpp's usual
"mostly f16"), or all f32. The tokenizer goes in whole: every token string, its type
(CONTROL for special tokens, USER_DEFINED for other added tokens, UNUSED for padding rows,
NORMAL otherwise), the BPE merges, bos/eos/eot/pad ids and the chat template.

RoPE and the Q/K permutation. llama.cpp's "llama" graph rotates ADJACENT pairs of a head,
(x[2i], x[2i+1]) at frequency theta^(-2i/d): Meta's original layout. Our model (like Hugging
Face) rotates HALVES, (x[i], x[i + d/2]) at the same frequency. So, as llama.cpp's own
HF->GGUF converter does, the rows of attn_q / attn_k are reordered per head so that row 2i
holds our row i and row 2i+1 our row i + d/2:

    w.view(heads, 2, d/2, in).transpose(1, 2).reshape(out, in)       (heads = n_kv_head for K)

Attention scores are unchanged: q.k sums over the same pairs, each rotated by the same angle
(tests/test_gguf.py computes scores with adjacent-pair RoPE on the GGUF tensors and compares).
The "qwen2" graph uses NEOX (rotate-half) RoPE, so that export keeps our layout unpermuted.

Mixture of experts: llama.cpp's Mixtral layout, the "llama" graph with llama.expert_count and
llama.expert_used_count (softmax router, top-k, gates renormalised: our token choice), the router
as blk.N.ffn_gate_inp (kept f32) and each layer's experts stacked into one 3-D tensor per
projection, blk.N.ffn_{gate,up,down}_exps (E, out, in). That layout has no shared experts, no
dense layers between MoE layers and no q/k/v biases: such models are refused (export them with
--format hf), as are expert-choice models (interop/hf.py load_for_export).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.interop.hf_moe import mixtral_lacks
from llmforge.run import atomic_path

GGUF_DTYPES = ("f16", "f32")


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> adjacent-pair rows, per head (see the module docstring)."""
    out_features = w.shape[0]
    head_dim = out_features // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_name(name: str) -> str:
    """GGUF name of one of our tensors (llama.cpp's names, shared by the llama and qwen2 graphs)."""
    import gguf
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    top = {"embed.weight": names[T.TOKEN_EMBD] + ".weight", "norm.weight": names[T.OUTPUT_NORM] + ".weight",
           "lm_head.weight": names[T.OUTPUT] + ".weight"}
    if name in top:
        return top[name]
    _, layer, *rest = name.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    kinds = {"attn.q_proj": T.ATTN_Q, "attn.k_proj": T.ATTN_K, "attn.v_proj": T.ATTN_V,
             "attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
             "mlp.down_proj": T.FFN_DOWN, "input_norm": T.ATTN_NORM, "post_attn_norm": T.FFN_NORM,
             "mlp.router": T.FFN_GATE_INP, "mlp.experts.gate_proj": T.FFN_GATE_EXP,
             "mlp.experts.up_proj": T.FFN_UP_EXP, "mlp.experts.down_proj": T.FFN_DOWN_EXP}
    return names[kinds[module]].format(bid=int(layer)) + "." + suffix


def gguf_tensors(model, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict under GGUF names, Q/K rows permuted for the llama graph; tied lm_head omitted
    (llama.cpp falls back to token_embd when there is no output.weight). The experts of a layer
    are stacked: layers.N.mlp.experts.E.gate_proj.weight -> row E of blk.N.ffn_gate_exps.weight."""
    out, experts = {}, {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        parts = name.split(".")
        if parts[2:4] == ["mlp", "experts"]:   # layers.N.mlp.experts.E.PROJ.weight
            stacked = ".".join(parts[:4] + parts[5:])
            experts.setdefault(stacked, []).append(t.detach().float().cpu())
            continue
        t = t.detach().float().cpu()
        if arch == "llama" and ".attn.q_proj." in name:
            t = permute_for_llama_cpp(t, cfg.n_head)
        elif arch == "llama" and ".attn.k_proj." in name:
            t = permute_for_llama_cpp(t, cfg.n_kv_head)
        out[gguf_tensor_name(name)] = t
    for name, ts in experts.items():
        out[gguf_tensor_name(name)] = torch.stack(ts)
    return out


def check_mixtral_layout(cfg: ModelConfig) -> None:
    """An MoE model must fit llama.cpp's Mixtral layout (see the module docstring)."""
    lacks = mixtral_lacks(cfg)
    if lacks:
        raise UserError(f"GGUF export writes llama.cpp's Mixtral layout, which has no {lacks[0]}; "
                        "export this model with --format hf (Qwen2-MoE) instead")


def _tokenizer_fields(tok_json: dict, vocab_size: int):
    """(tokenizer model, token strings, token types, merges) for a byte-level BPE tokenizer.json."""
    import gguf
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"the checkpoint's tokenizer is a {model.get('type')} model; GGUF export supports BPE "
                        "tokenizers (llmforge's, GPT-2/Llama-3/Qwen-style byte-level BPE)")
    if model.get("byte_fallback"):
        raise UserError("the checkpoint's tokenizer is a SentencePiece-style BPE (byte_fallback); GGUF export "
                        "writes byte-level BPE only. Convert it with llama.cpp's convert_hf_to_gguf.py from "
                        "`llmforge export --format hf` instead")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for i, t in added.items():
        id_to_token[i] = t["content"]
    n = max(vocab_size, max(id_to_token) + 1)
    if n > vocab_size:
        raise UserError(f"the tokenizer has {max(id_to_token) + 1} tokens but the model only {vocab_size} "
                        "embedding rows; the checkpoint's tokenizer.json does not belong to its weights")
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (vocab padded to a round number)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return "gpt2", tokens, [int(t) for t in types], merges


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp) for the names written below: "llama-bpe"
# is GPT-4's split with 1-3 digit groups (Llama 3), "qwen2" the same split with single digits.
# tests/test_gguf.py checks that each splits text exactly as the llmforge preset it stands for.
LLAMA_CPP_PRE_REGEX = {
    "llama-bpe": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def _pre_tokenizer_name(tok_json: dict, config: dict) -> str:
    """llama.cpp picks its pre-tokenizer regex by name, so the name must be one whose regex splits
    like ours. llmforge's presets: GPT-4's split with 1-3 digit groups (also with whole-number
    tokens: their merges travel in the file) -> "llama-bpe"; the same split with single digits ->
    "qwen2" (Qwen2's regex is exactly that); an imported Qwen2 model -> "qwen2". A split llama.cpp
    has no name for (e.g. CJK runs cut in pieces) -> "default" with a warning."""
    if (config.get("hf") or {}).get("model_type") == "qwen2":
        return "qwen2"
    pre = tok_json.get("pre_tokenizer") or {}
    patterns = [p.get("pattern", {}).get("Regex", "") for p in pre.get("pretokenizers", [pre])
                if isinstance(p, dict) and p.get("type") == "Split"]
    if len(patterns) == 1 and r"\p{Han}" not in patterns[0]:
        from llmforge.tokenizer.bpe import split_pattern
        if patterns[0] == split_pattern(single_digits=False):
            return "llama-bpe"
        if patterns[0] == split_pattern(single_digits=True):
            return "qwen2"
    text = json.dumps(pre)
    if r"\\p{N}{1,3}" in text and "Split" in text and r"\\p{Han}" not in text:
        return "llama-bpe"   # a GPT-4-family split from elsewhere
    warnings.warn("GGUF export: this tokenizer's pre-tokenizer has no llama.cpp equivalent; writing "
                  "tokenizer.ggml.pre='default' (GPT-2's split), so llama.cpp will tokenize some text differently")
    return "default"


def export_gguf(ckpt, out, dtype: str = "f16") -> Path:
    """Write checkpoint `ckpt` as one GGUF file: `out` if it ends in .gguf, else `out`/model-DTYPE.gguf."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise UserError(f"unknown GGUF dtype '{dtype}'; choose one of: {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        if out.is_file():
            raise UserError(f"--out {out} is a file without the .gguf suffix; give a folder or a NAME.gguf path")
        out = out / f"model-{dtype}.gguf"
    from llmforge.interop.hf import load_for_export
    model, config, folder, tok_json = load_for_export(ckpt)
    if config.get("vision"):
        raise UserError(f"checkpoint {folder} is a vision model; GGUF export of it (llama.cpp's mmproj file for the "
                        "image tower) is not written: export it with --format hf (LLaVA)")
    cfg: ModelConfig = model.cfg
    tok_model, tokens, types, merges = _tokenizer_fields(tok_json, cfg.vocab_size)
    specials = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    arch = "qwen2" if cfg.qkv_bias else "llama"
    if cfg.moe_experts:
        check_mixtral_layout(cfg)

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(config.get("source") or folder).name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.expert_dim if cfg.moe_experts else cfg.ffn_dim)
        if cfg.moe_experts:
            w.add_expert_count(cfg.moe_experts)
            w.add_expert_used_count(cfg.moe_top_k)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)

        w.add_tokenizer_model(tok_model)
        w.add_tokenizer_pre(_pre_tokenizer_name(tok_json, config))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        _add_special_ids(w, config, specials)
        from llmforge.tokenizer.chat import CHAT_TEMPLATE
        w.add_chat_template(config.get("chat_template") or CHAT_TEMPLATE)

        for name, t in gguf_tensors(model, cfg, arch).items():
            array = t.numpy()
            # norms, biases and the router stay f32, as llama.cpp's own converter writes them
            if dtype == "f16" and array.ndim >= 2 and not name.endswith("ffn_gate_inp.weight"):
                array = array.astype(np.float16)
            w.add_tensor(name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        from llmforge.interop.hf import default_permissions
        default_permissions(tmp)
    return out


def _add_special_ids(w, config: dict, specials: dict[str, int]) -> None:
    hf = config.get("hf") or {}  # an imported model keeps the special ids it was trained with
    if not hf and "<|bos|>" in specials and "<|end|>" in specials:
        # a base model ends documents with <|eot|>; chat models end each turn with <|end|>
        eos = specials["<|eot|>"] if config.get("kind") == "base" else specials["<|end|>"]
        w.add_bos_token_id(specials["<|bos|>"])
        w.add_eos_token_id(eos)
        w.add_eot_token_id(specials["<|end|>"])
        w.add_pad_token_id(specials["<|eot|>"])
        w.add_add_bos_token(False)  # the chat template writes <|bos|> itself
        return
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        value = hf.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            add(value)
