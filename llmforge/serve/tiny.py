"""A tiny random-weight checkpoint for tests, demos and smoke runs of the server (seconds, offline).

    folder = make_tiny_checkpoint("/tmp/tiny")      # ckpt folder: model.safetensors, config.json, tokenizer.json
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmforge.config import ModelConfig

_TEXT = """The quick brown fox jumps over the lazy dog. {"name": "calculator", "arguments": {"expression": "2+2"}}
def add(a, b):\n    return a + b\nprint(add(1, 2))\n[1, 2, 3] true false null 3.14 -7 "hello" Paris is in France.
What is 12 * 7? It is 84. Thank you! You're welcome.\n"""


def make_tiny_checkpoint(folder, *, vocab_size: int = 320, d_model: int = 64, n_layer: int = 2,
                         max_seq_len: int = 256, seed: int = 0, kind: str = "sft", vision: bool = False) -> Path:
    """vision=True: a vision checkpoint (kind "vision": a 16x16-pixel, 4-token image tower in front)."""
    import dataclasses

    from llmforge.model.transformer import Transformer
    from llmforge.tokenizer.bpe import Tokenizer
    from llmforge.train.checkpoint import save_checkpoint

    tok = Tokenizer.train([_TEXT] * 20, vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d_model,
                      max_seq_len=max_seq_len)
    model = Transformer(cfg)
    meta = {"stage": kind, "step": 0}
    if vision:
        from llmforge.model.vision import VisionLanguageModel, VisionTowerConfig
        tower = VisionTowerConfig(image_size=16, patch_size=8, width=32, n_layer=1, n_head=2)
        model, kind, meta = VisionLanguageModel(model, tower), "vision", {**meta, "vision": dataclasses.asdict(tower)}
    return save_checkpoint(Path(folder), model, kind=kind, model_cfg=cfg, tokenizer=tok, meta=meta)
