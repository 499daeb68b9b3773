"""Interoperability: llmforge checkpoints in and out of the formats other tools read.

    export_checkpoint(ckpt, "hf", out)    -> a transformers Llama / Qwen2 / Mixtral / Qwen2-MoE folder
    export_checkpoint(ckpt, "gguf", out)  -> a llama.cpp / Ollama GGUF file
    import_hf(hf_dir, out)                -> a llmforge "base" checkpoint from a local HF folder

LoRA lives in llmforge/model/lora.py; the lm-evaluation-harness model in lm_eval_adapter.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from llmforge.errors import UserError

EXPORT_FORMATS = ("hf", "gguf")


def export_checkpoint(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike, **options) -> Path:
    """Export checkpoint (folder or run directory) `ckpt` as `fmt` to `out`; returns what was written.
    gguf takes `dtype="f16"|"f32"` (default f16)."""
    if fmt == "hf":
        from llmforge.interop.hf import export_hf
        return export_hf(ckpt, out, **options)
    if fmt == "gguf":
        from llmforge.interop.gguf_export import export_gguf
        return export_gguf(ckpt, out, **options)
    raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(EXPORT_FORMATS)}")


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """Import a local Hugging Face Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE folder as a llmforge base checkpoint."""
    from llmforge.interop.hf import import_hf as _import_hf
    return _import_hf(hf_dir, out, **options)
