"""Checkpoints: a folder with safetensors weights and a JSON config (never pickle).

    ckpt/KIND/model.safetensors   weights (tied lm_head stored once, as embed.weight)
    ckpt/KIND/config.json         {"kind", "model": ModelConfig, "tokenizer_hash", "stage", "step", ...}
    ckpt/KIND/tokenizer.json      the tokenizer, so a checkpoint folder is self-contained
    ckpt/KIND/train_state.safetensors + train_state.json   optimizer, schedule, RNG, loader (resume)

A sharded checkpoint (train.parallel = "fsdp") holds instead, for resume:
    ckpt/KIND/sharded/            torch.distributed.checkpoint: model + optimizer state, each rank's
                                  slices in its own file, keyed by parameter name (so it loads on
                                  any world size, sharded or not)
    ckpt/KIND/train_state.*       RNG and position only
and model.safetensors only when training finished or stopped (the whole weights, for the next stage,
export and serving); `llmforge consolidate CKPT` writes it for a checkpoint taken mid-run.

A whole checkpoint folder is written under a temporary name and renamed into place, so a
crash at any moment leaves either the previous checkpoint or the new one, never a mix (a sharded
one needs a filesystem every rank sees: all ranks write into the same temporary folder).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmforge.config import ModelConfig
from llmforge.errors import UserError
from llmforge.run import RunDir, atomic_path, replace_dir
from llmforge.train.distributed import is_sharded

SHARDED = "sharded"   # the torch.distributed.checkpoint folder inside a sharded checkpoint
POLICY_KINDS = ("base", "sft", "rl", "vision")   # vision: a language model with an image encoder
LATEST_ORDER = ("rl", "sft", "base")  # what a run directory means when given as a model


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on the CPU, tied ones once. For an FSDP model every rank must call it (the
    shards are gathered); rank 0 gets the weights, the others an empty dict."""
    state = model.state_dict()
    names, seen = [], set()
    for name, t in state.items():
        ptr = (t.to_local() if hasattr(t, "to_local") else t).data_ptr()
        if ptr not in seen:  # tied weights are stored once
            seen.add(ptr)
            names.append(name)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: state[name].detach().to("cpu").contiguous() for name in names if name in state}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameter names and values: what a cached evaluation of it is keyed by
    (a checkpoint retrained at the same path gets a new digest)."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _one_process_quietly(several: bool):
    """torch.distributed.checkpoint warns that it assumes one process even when told no_dist."""
    with warnings.catch_warnings():
        if not several:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _world() -> tuple[bool, bool]:
    """(several processes, this is rank 0)."""
    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return several, not several or torch.distributed.get_rank() == 0


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, kind: str, model_cfg: ModelConfig,
                    tokenizer=None, meta: dict | None = None, train_state: dict | None = None,
                    sharded_optimizer=None, full_weights: bool = True) -> Path:
    """Write a checkpoint folder atomically. `train_state` = {"tensors": {...}, "json": {...}}.

    With `sharded_optimizer` the checkpoint is sharded and every rank must call this: each writes its
    own slices of the model and of that optimizer's state to sharded/ (torch.distributed.checkpoint,
    get_state_dict), rank 0 the small files; model.safetensors only if `full_weights`."""
    path = Path(path)
    several, main = _world() if sharded_optimizer is not None else (False, True)
    tmp = None
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a checkpoint is meant to be shared
    if several:  # one temporary folder for all ranks
        box = [tmp]
        torch.distributed.broadcast_object_list(box, src=0)
        tmp = box[0]
    try:
        if sharded_optimizer is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_sd, optim_sd = get_state_dict(model, sharded_optimizer)
            with _one_process_quietly(several):
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED, no_dist=not several)
        weights = _weights_of(model) if full_weights else None
        if main:
            if weights is not None:
                save_file(weights, str(tmp / "model.safetensors"))
            config = {"kind": kind, "model": dataclasses.asdict(model_cfg), **(meta or {})}
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer.json")
                config["tokenizer_hash"] = tokenizer.hash
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            if train_state is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in train_state["tensors"].items()},
                          str(tmp / "train_state.safetensors"))
                (tmp / "train_state.json").write_text(json.dumps(train_state["json"]), encoding="utf-8")
        if several:
            torch.distributed.barrier()  # every rank's shards are on disk before the folder is renamed
        if main:
            replace_dir(tmp, path)
        if several:
            torch.distributed.barrier()  # and no rank reads the old folder after this returns
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SHARDED / ".metadata").is_file()


def load_sharded(folder: str | os.PathLike, model: torch.nn.Module, optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state into `model` (FSDP-sharded on any number
    of ranks, or whole in one process) and `optimizer`: each rank reads the slices it owns."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    several = _world()[0]
    try:
        with _one_process_quietly(several):
            dcp.load(state, checkpoint_id=Path(folder) / SHARDED, no_dist=not several)
    except Exception as e:  # DCP wraps a missing key or a bad file in CheckpointException
        raise UserError(f"sharded checkpoint {folder} does not fit this model and optimizer "
                        f"({str(e).splitlines()[0][:200]}); resume with the config it was saved with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(path: str | os.PathLike) -> Path:
    """Write model.safetensors of a sharded checkpoint from its shards, in one process, whatever the
    world size that saved it: the usual checkpoint for export, serving and the next stage."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    folder = Path(path)
    if not is_sharded_checkpoint(folder):
        raise UserError(f"{folder} is not a sharded checkpoint (no {SHARDED}/.metadata); pass a checkpoint "
                        "folder written with train.parallel=fsdp")
    config = read_config(folder, sharded_ok=True)
    reader = dcp.FileSystemReader(str(folder / SHARDED))
    weights = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in reader.read_metadata().state_dict_metadata.items()
               if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with _one_process_quietly(False):
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    if config["model"].get("tie_embeddings"):  # stored once, as the embedding (load_into re-ties it)
        weights = {k: v for k, v in weights.items() if not k.endswith("lm_head.weight")}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(weights, str(tmp))
    return folder / "model.safetensors"


def resolve_checkpoint(path: str | os.PathLike, kinds=LATEST_ORDER) -> Path:
    """A checkpoint folder, its config.json, or a run directory (its latest checkpoint of `kinds`)."""
    path = Path(path)
    if path.is_file() and path.name in ("config.json", "model.safetensors"):
        path = path.parent
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if (path / "config.json").is_file() and is_sharded_checkpoint(path):
        raise UserError(f"{path} is a sharded checkpoint taken mid-run (no model.safetensors yet); run "
                        f"`llmforge consolidate {path}` to write its whole weights, or resume its training")
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


def read_config(path: str | os.PathLike, sharded_ok: bool = False) -> dict:
    """A checkpoint's config.json; `sharded_ok`: also of a sharded one without whole weights (resume)."""
    path = Path(path) if sharded_ok and is_sharded_checkpoint(path) else resolve_checkpoint(path)
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
