"""Checkpoints: a folder with safetensors weights and a JSON config (never pickle).

    ckpt/KIND/model.safetensors   weights (tied lm_head stored once, as embed.weight)
    ckpt/KIND/config.json         {"kind", "model": ModelConfig, "tokenizer_hash", "stage", "step", ...}
    ckpt/KIND/tokenizer.json      the tokenizer, so a checkpoint folder is self-contained
    ckpt/KIND/train_state.safetensors + train_state.json   optimizer, schedule, RNG, loader (resume)

A whole checkpoint folder is written under a temporary name and renamed into place, so a
crash at any moment leaves either the previous checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.run import RunDir, replace_dir

POLICY_KINDS = ("base", "sft", "rl", "vision")   # vision: a language model with an image encoder
LATEST_ORDER = ("rl", "sft", "base")  # what a run directory means when given as a model


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    seen = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied weights are stored once
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().to("cpu").contiguous()
    return state


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, kind: str, model_cfg: ModelConfig,
                    tokenizer=None, meta: dict | None = None, train_state: dict | None = None) -> Path:
    """Write a checkpoint folder atomically. `train_state` = {"tensors": {...}, "json": {...}}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a checkpoint is meant to be shared
    try:
        save_file(_weights_of(model), str(tmp / "model.safetensors"))
        config = {"kind": kind, "model": dataclasses.asdict(model_cfg), **(meta or {})}
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            config["tokenizer_hash"] = tokenizer.hash
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        if train_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in train_state["tensors"].items()},
                      str(tmp / "train_state.safetensors"))
            (tmp / "train_state.json").write_text(json.dumps(train_state["json"]), encoding="utf-8")
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_checkpoint(path: str | os.PathLike, kinds=LATEST_ORDER) -> Path:
    """A checkpoint folder, its config.json, or a run directory (its latest checkpoint of `kinds`)."""
    path = Path(path)
    if path.is_file() and path.name in ("config.json", "model.safetensors"):
        path = path.parent
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for kind in kinds:
        # RL policies live in ckpt/rl_<algo>; the most recently written one is the latest
        found = sorted((c for c in (path / "ckpt").glob(f"{kind}*") if _is_policy_folder(c, kind)),
                       key=lambda c: (c / "config.json").stat().st_mtime, reverse=True)
        if found:
            return found[0]
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint folder or a run directory")
    raise UserError(f"{path} is not a checkpoint (no config.json + model.safetensors) nor a run directory "
                    f"with ckpt/{{{','.join(kinds)}}}; train one first or pass the right path")


def _is_policy_folder(folder: Path, kind: str) -> bool:
    if folder.name != kind and not (kind == "rl" and folder.name.startswith("rl_")):
        return False
    try:
        return json.loads((folder / "config.json").read_text()).get("kind") == kind
    except (OSError, json.JSONDecodeError):
        return False


def read_config(path: str | os.PathLike) -> dict:
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} is corrupt ({e}); re-save the checkpoint") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(path) / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / 'model.safetensors'} cannot be read ({e}); the checkpoint is corrupt, "
                        "re-train or re-export it") from None


def model_config_from(config: dict) -> ModelConfig:
    return ModelConfig(**config["model"])


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"checkpoint {where} does not fit this model ({str(e).splitlines()[-1].strip()}); "
                        "check that its config.json matches its weights") from None
    if _is_tied(model):  # the tied lm_head was stored once, as the embedding
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
    routed = [k for k in unexpected if ".mlp.router." in k]
    if routed:
        raise UserError(f"checkpoint {where} holds mixture-of-experts weights ({routed[0]}) but the model config is "
                        "dense (model.moe_experts=0); load it with the config.json saved beside it, which sets "
                        "model.moe_experts")
    if missing or unexpected:
        raise UserError(f"checkpoint {where} does not fit this model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); load it with the model kind it was saved from")


def _is_tied(model) -> bool:
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "trunk", None), "cfg", None)
    return bool(cfg and cfg.tie_embeddings)


def load_model(path: str | os.PathLike, kinds=POLICY_KINDS, device="cpu"):
    """Load a checkpoint of one of `kinds` -> (model, config dict, folder). Policies come back
    as a Transformer, vision checkpoints (config "vision") as a VisionLanguageModel around one;
    reward/value checkpoints ("rm*", "value") as a ScalarHeadModel."""
    from llmforge.model.heads import ScalarHeadModel
    from llmforge.model.transformer import Transformer

    folder = resolve_checkpoint(path, kinds=[k for k in LATEST_ORDER if k in kinds] or kinds)
    config = read_config(folder)
    kind = config.get("kind", "?")
    if kind not in kinds:
        raise UserError(f"{folder} is a '{kind}' checkpoint but a {' or '.join(kinds)} checkpoint is "
                        f"needed here; pass the right checkpoint")
    model = Transformer(model_config_from(config))
    if config.get("head") == "scalar":
        model = ScalarHeadModel(model)
    if config.get("vision"):
        from llmforge.model.vision import VisionLanguageModel, VisionTowerConfig
        model = VisionLanguageModel(model, VisionTowerConfig(**config["vision"]))
    if config.get("lora"):  # saved from a LoRA-wrapped model: load base + adapters, merge
        from llmforge.model.lora import load_lora_checkpoint_into
        load_lora_checkpoint_into(model, load_weights(folder), config["lora"])
    else:
        load_into(model, load_weights(folder), folder)
    return model.to(device), config, folder


def load_tokenizer(path: str | os.PathLike):
    from llmforge.tokenizer.bpe import Tokenizer
    folder = resolve_checkpoint(path)
    return Tokenizer.load(folder / "tokenizer.json")


# ---------------------------------------------------------------- a run's checkpoints

def load_run_tokenizer(run: RunDir):
    """The run's tokenizer (run.tokenizer), with the fix when it is missing."""
    from llmforge.tokenizer.bpe import Tokenizer
    if not run.tokenizer.is_file():
        raise UserError(f"{run.tokenizer} is missing; run `llmforge data prepare --out {run.root}` first")
    return Tokenizer.load(run.tokenizer)


def load_run_checkpoint(run: RunDir, folder: str, kinds, tok, hint: str):
    """(model, config) of ckpt/<folder>, checking its kind and that its tokenizer is the run's."""
    path = run.ckpt(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is missing; {hint}")
    model, config, _ = load_model(path, kinds=kinds)
    if config.get("tokenizer_hash") not in (None, tok.hash):
        raise UserError(f"{path} was trained with a different tokenizer than {run.tokenizer}; "
                        "use the tokenizer of the run that produced the checkpoint")
    return model, config
