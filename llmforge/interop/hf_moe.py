"""Mixture-of-experts checkpoints <-> transformers' Mixtral and Qwen2-MoE (used by interop/hf.py).

A token-choice model (model/moe.py: softmax, top-k, gates renormalised over the k, dropless at
inference) is exactly Mixtral's sparse block, and Qwen2-MoE's with norm_topk_prob=true:

    ours (layers.N.)                 MixtralForCausalLM (model.layers.N.)   Qwen2MoeForCausalLM
    mlp.router.weight                block_sparse_moe.gate.weight           mlp.gate.weight
    mlp.experts.E.gate_proj.weight   block_sparse_moe.experts.E.w1.weight   mlp.experts.E.gate_proj.weight
    mlp.experts.E.down_proj.weight   block_sparse_moe.experts.E.w2.weight   mlp.experts.E.down_proj.weight
    mlp.experts.E.up_proj.weight     block_sparse_moe.experts.E.w3.weight   mlp.experts.E.up_proj.weight
    mlp.shared.*                     (none)                                 mlp.shared_expert.*

Mixtral is written when every layer is MoE with no shared experts and no q/k/v biases; anything
else goes to Qwen2-MoE, whose decoder_sparse_step is our moe_every (layer i sparse when
(i + 1) % step == 0). Qwen2-MoE multiplies its shared expert by sigmoid(w . x), a gate our
shared experts do not have: the export writes w = 0 (sigmoid = 1/2) and the shared down_proj
times 2, both exact in floating point; import accepts only that gate (w = 0) and halves it back.
Qwen2-MoE's q/k/v always have biases in transformers 4: a model without them gets zeros.
Expert-choice models are refused (their decoding rule, gates not renormalised, is another model).
"""
from __future__ import annotations

import re

import torch

from llmforge.config import ModelConfig
from llmforge.errors import UserError

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe")

# (ours, theirs) after "layers.N." / "model.layers.N."; {e} is the expert index
_NAMES = {
    "mixtral": [("mlp.router.", "block_sparse_moe.gate."),
                ("mlp.experts.{e}.gate_proj.", "block_sparse_moe.experts.{e}.w1."),
                ("mlp.experts.{e}.down_proj.", "block_sparse_moe.experts.{e}.w2."),
                ("mlp.experts.{e}.up_proj.", "block_sparse_moe.experts.{e}.w3.")],
    "qwen2_moe": [("mlp.router.", "mlp.gate."), ("mlp.shared.", "mlp.shared_expert."),
                  ("mlp.experts.{e}.", "mlp.experts.{e}.")],
}


def _rename(rest: str, pairs, src: int) -> str | None:
    for pair in pairs:
        pattern = re.escape(pair[src]).replace(r"\{e\}", r"(\d+)")
        m = re.match(pattern, rest)
        if m:
            return pair[1 - src].replace("{e}", m.group(1) if m.groups() else "") + rest[m.end():]
    return None


def to_hf(rest: str, arch: str) -> str | None:
    """Their name (after model.layers.N.) of our MoE tensor `rest` (after layers.N.); None if not MoE."""
    return _rename(rest, _NAMES.get(arch, ()), 0)


def from_hf(rest: str, arch: str) -> str | None:
    return _rename(rest, _NAMES.get(arch, ()), 1)


def mixtral_lacks(cfg: ModelConfig) -> list[str]:
    """What of this MoE model the Mixtral layout (transformers' and llama.cpp's) cannot hold."""
    return [what for what, has in (("shared experts (model.moe_shared_experts)", cfg.moe_shared_experts),
                                   ("dense layers between MoE layers (model.moe_every > 1)", cfg.moe_every > 1),
                                   ("q/k/v biases", cfg.qkv_bias)) if has]


def hf_arch(cfg: ModelConfig) -> str:
    """mixtral or qwen2_moe (see the module docstring); interop/hf.py refuses expert choice before."""
    return "qwen2_moe" if mixtral_lacks(cfg) else "mixtral"


def hf_moe_config(cfg: ModelConfig, arch: str) -> dict:
    """The keys of config.json that differ from the dense (Llama / Qwen2) export."""
    if arch == "mixtral":
        return {"intermediate_size": cfg.expert_dim,
                "num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
                "router_aux_loss_coef": cfg.moe_aux_coef, "router_jitter_noise": 0.0, "sliding_window": None}
    return {"intermediate_size": cfg.ffn_dim,
            "moe_intermediate_size": cfg.expert_dim, "num_experts": cfg.moe_experts,
            "num_experts_per_tok": cfg.moe_top_k, "decoder_sparse_step": cfg.moe_every, "mlp_only_layers": [],
            "shared_expert_intermediate_size": cfg.moe_shared_experts * cfg.expert_dim, "norm_topk_prob": True,
            "router_aux_loss_coef": cfg.moe_aux_coef, "qkv_bias": True, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.n_layer}


def export_tensors(weights: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> None:
    """Qwen2-MoE: the ungated shared expert as a gate of 1/2 and twice the down_proj, zero q/k/v
    biases when the model has none, an empty shared expert when it has no shared experts."""
    if arch != "qwen2_moe":
        return
    d, dtype = cfg.d_model, weights["model.embed_tokens.weight"].dtype
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        if not cfg.qkv_bias:
            for proj, width in (("q", cfg.n_head), ("k", cfg.n_kv_head), ("v", cfg.n_kv_head)):
                weights[f"{p}self_attn.{proj}_proj.bias"] = torch.zeros(width * cfg.head_dim, dtype=dtype)
        if not cfg.is_moe_layer(i):
            continue
        weights[f"{p}mlp.shared_expert_gate.weight"] = torch.zeros(1, d, dtype=dtype)
        if cfg.moe_shared_experts:
            weights[f"{p}mlp.shared_expert.down_proj.weight"] = weights[f"{p}mlp.shared_expert.down_proj.weight"] * 2
        else:
            for proj, shape in (("gate", (0, d)), ("up", (0, d)), ("down", (d, 0))):
                weights[f"{p}mlp.shared_expert.{proj}_proj.weight"] = torch.zeros(shape, dtype=dtype)


def config_from_hf(hf: dict, need) -> dict:
    """ModelConfig fields of a Mixtral / Qwen2-MoE config.json; UserError for what we cannot express."""
    if hf["model_type"] == "mixtral":
        top_k, width = need("num_experts_per_tok"), need("intermediate_size")
        return dict(moe_experts=need("num_local_experts"), moe_top_k=top_k, moe_d_ff=width, d_ff=width * top_k)
    if hf.get("mlp_only_layers"):
        raise UserError(f"config.json mlp_only_layers={hf['mlp_only_layers']} is not supported; llmforge picks MoE "
                        "layers by decoder_sparse_step (model.moe_every) alone")
    if not hf.get("norm_topk_prob", False):
        raise UserError("config.json norm_topk_prob=false is not supported: llmforge's token-choice router "
                        "renormalises the top-k gates (Mixtral's rule); import a model with norm_topk_prob=true")
    width, shared = need("moe_intermediate_size"), hf.get("shared_expert_intermediate_size", 0)
    if shared % width:
        raise UserError(f"config.json shared_expert_intermediate_size={shared} is not a multiple of "
                        f"moe_intermediate_size={width}; llmforge's shared experts have the routed experts' width")
    return dict(moe_experts=need("num_experts"), moe_top_k=need("num_experts_per_tok"), moe_d_ff=width,
                moe_every=hf.get("decoder_sparse_step", 1), moe_shared_experts=shared // width)


def import_tensors(weights: dict[str, torch.Tensor], model_type: str, where) -> None:
    """Undo export_tensors: drop the (zero) shared-expert gates and empty shared experts, halve the
    shared down_proj back. A learned gate (w != 0) is refused: llmforge's shared experts are ungated."""
    if model_type != "qwen2_moe":
        return
    for name in [n for n in weights if n.endswith("mlp.shared_expert_gate.weight")]:
        if weights[name].abs().max() > 0:
            raise UserError(f"{where}: {name} is a learned shared-expert gate, which llmforge's shared experts do "
                            "not have; only models with a zero gate (as llmforge exports them) can be imported")
        del weights[name]
        down = name.replace("shared_expert_gate.weight", "shared_expert.down_proj.weight")
        if down in weights and weights[down].numel():
            weights[down] = weights[down] / 2
        else:
            for proj in ("gate", "up", "down"):
                weights.pop(name.replace("shared_expert_gate.", f"shared_expert.{proj}_proj."), None)
