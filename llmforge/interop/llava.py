"""A vision checkpoint (model/vision.py) as a transformers LLaVA folder: LlavaForConditionalGeneration
with a SigLIP vision tower and the Llama (or Qwen2) language model that hf.py exports, loaded
unmodified; tests/test_vision.py checks logits within 1e-4 and identical greedy tokens.

    llmforge export runs/x/ckpt/vision --format hf --out hf_vision

    ours                                HF hub layout (llava-hf checkpoints; transformers 4 and 5 read it)
    trunk.*                             language_model.model.* / language_model.lm_head.weight
    encoder.patch_embedding.*           vision_tower.vision_model.embeddings.patch_embedding.*
    encoder.position_embedding.weight   vision_tower.vision_model.embeddings.position_embedding.weight
    encoder.layers.N.*                  vision_tower.vision_model.encoder.layers.N.*  (same names below)
    (none: LLaVA reads the last block)  vision_tower.vision_model.post_layernorm.*  (identity, unused)
    projector.linear_{1,2}.*            multi_modal_projector.linear_{1,2}.*

transformers looks every input id up in the embedding before it places the image features, so the
placeholder id (our text vocab_size) gets a row of zeros and the text vocabulary grows by one;
generation_config.json suppresses that id, so greedy decoding never writes it. A prompt holds
`image_seq_length` copies of `image_token_index` per image (the tokenizer has no <image> string:
build the ids as tokenizer/chat.render does), and preprocessor_config.json is the SigLIP image
processor with this tower's size (resize, x / 255, mean 0.5, std 0.5 = data/images.to_pixels).

GGUF (llama.cpp) would need a second file, the projector and tower as an "mmproj" GGUF
(clip.vision.* keys, as llama.cpp's convert_image_encoder_to_gguf writes them): not written.
"""
from __future__ import annotations

import torch


def llava_weights(model, text_weights: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """The whole LLaVA state dict from the exported language model's tensors (hf.py names)."""
    out = {}
    for name, t in text_weights.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):   # a zero row for the placeholder id
            t = torch.cat([t, torch.zeros(1, t.shape[1], dtype=t.dtype)])
        out["language_model." + name] = t
    tower = "vision_tower.vision_model."
    for name, t in model.encoder.state_dict().items():
        where = "encoder." if name.startswith("layers.") else "embeddings."
        out[tower + where + name] = t.detach().to(dtype).contiguous()
    width = model.tower.width
    out[tower + "post_layernorm.weight"] = torch.ones(width, dtype=dtype)
    out[tower + "post_layernorm.bias"] = torch.zeros(width, dtype=dtype)
    for name, t in model.projector.state_dict().items():
        out["multi_modal_projector." + name] = t.detach().to(dtype).contiguous()
    return out


def llava_config(model, text_config: dict) -> dict:
    """config.json: LLaVA around the language model's config (vocab + 1) and a SigLIP vision config."""
    tower, placeholder = model.tower, model.image_token_id
    vision = {"model_type": "siglip_vision_model", "hidden_size": tower.width,
              "intermediate_size": tower.width * tower.mlp_ratio, "num_hidden_layers": tower.n_layer,
              "num_attention_heads": tower.n_head, "num_channels": 3, "image_size": tower.image_size,
              "patch_size": tower.patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": tower.norm_eps,
              "attention_dropout": 0.0, "vision_use_head": False}
    text = {**text_config, "vocab_size": placeholder + 1}
    text.pop("architectures", None)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
            "vision_config": vision, "image_token_index": placeholder, "image_token_id": placeholder,
            "image_seq_length": model.image_tokens, "projector_hidden_act": "gelu",
            "vision_feature_select_strategy": "full", "vision_feature_layer": -1, "multimodal_projector_bias": True,
            "tie_word_embeddings": text_config["tie_word_embeddings"], "dtype": text_config["dtype"],
            "torch_dtype": text_config["dtype"]}


def preprocessor_config(model) -> dict:
    size = model.tower.image_size
    return {"image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
