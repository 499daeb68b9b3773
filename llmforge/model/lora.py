"""LoRA: fine-tune a frozen model through low-rank adapters (Hu et al. 2021, "LoRA").

A target Linear y = x W^T + b becomes

    y = x W^T + b + (alpha / r) * x A^T B^T       A: (r, in), B: (out, r), eq. (3) of the paper

with W, b frozen, A random (Kaiming-uniform, as nn.Linear) and B zero, so the wrapped model
computes exactly the base model until training moves B. Only A and B are trained: for the
default q_proj,v_proj targets that is well under 1% of a model's parameters.

How a stage uses it (SFT, DPO, reward, RL):

    from llmforge.model.lora import apply_lora, lora_meta, merge_lora, save_adapter
    model = apply_lora(model, cfg)        # a no-op when cfg.lora_rank == 0; freezes the base
    ckpt = Checkpointing(..., meta={..., "lora": lora_meta(model)})   # None without LoRA
    train(model, cfg, ...)                # the loop's optimizer only sees trainable params
    if lora_meta(model):
        save_adapter(model, run.root / "adapters" / "sft")   # the small file: adapters + base hash
        save_checkpoint(ckpt.dir, merge_lora(model), ...)    # a plain checkpoint for later stages

(keep the adapter folder outside ckpt/KIND: save_checkpoint replaces that folder whole).
Checkpoints the loop writes mid-run hold the wrapped model's state: base names unchanged plus
`*.lora_A` / `*.lora_B`, and config.json "lora" = lora_meta(model). `--resume` works as usual
(apply_lora before the loop loads the state); any other reader loads them with
`load_lora_checkpoint_into(Transformer(cfg), weights, config["lora"])`, as
llmforge.interop.hf.load_policy() does for export and lm_eval.

Tensor names do not change: a wrapped layers.0.attn.q_proj still has `.weight` (and `.bias`),
plus `.lora_A` and `.lora_B`, so base checkpoints load into a wrapped model unchanged.

Precision of the frozen base (cfg.lora_dtype): fp32; bf16 (every frozen Linear weight held in
bf16, inputs cast to it: half the memory, adapters stay fp32); int8 / nf4 through bitsandbytes
(LLM.int8 / QLoRA), which needs the bitsandbytes package and a CUDA device. On a CPU-only
machine or without bitsandbytes these raise a UserError saying so. Merging into a bf16 base
rounds the merged weights to bf16; merging into an int8/nf4 base is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmforge.errors import UserError

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_DTYPES = ("fp32", "bf16", "int8", "nf4")
ADAPTER_FORMAT = "llmforge-lora-v1"


class LoRALinear(nn.Module):
    """A frozen Linear (same parameter names: weight, bias) plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, base_dtype: str = "fp32"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if rank else 0.0
        self.merged = False
        self.quantized: nn.Module | None = None
        self.orig_dtype = base.weight.dtype  # what merge_lora() gives back
        weight = base.weight.detach()
        if base_dtype == "bf16":
            weight = weight.to(torch.bfloat16)
        if base_dtype in ("int8", "nf4"):
            self.quantized = _quantize(base, base_dtype)
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        if rank:
            device = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init; B = 0 keeps y = base

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x).to(x.dtype)
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # a bf16 base under fp32 activations: compute in the base's dtype, hand back x's
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if not self.rank or self.merged:
            return y
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update to W the adapters stand for: (alpha / r) * B A, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into W (inference without the extra matmuls, or for export)."""
        if self.merged or not self.rank:
            return
        self._check_mergeable()
        self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
        self.merged = False

    def _check_mergeable(self) -> None:
        if self.quantized is not None:
            raise UserError("cannot merge LoRA adapters into an int8/nf4 base; load the base in fp32 or bf16 "
                            "(lora_dtype=fp32), load_adapter() onto it, then merge")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _quantize(base: nn.Linear, kind: str) -> nn.Module:
    """The base Linear as a bitsandbytes 8-bit (LLM.int8) or 4-bit NF4 (QLoRA) layer, on CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"lora_dtype={kind} needs the bitsandbytes package, which is not installed (and needs a "
                        "CUDA GPU); on this machine use lora_dtype=bf16 or fp32") from None
    if base.weight.device.type != "cuda":
        raise UserError(f"lora_dtype={kind}: bitsandbytes quantization is not supported on "
                        f"{base.weight.device.type.upper()} here, only on CUDA GPUs; use lora_dtype=bf16 or fp32")
    device = base.weight.device
    has_bias = base.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(base.weight.detach().half().cpu(), requires_grad=False,
                                         has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=has_bias,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(base.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(base.bias.detach().cpu(), requires_grad=False)
    return layer.to(device)  # moving to CUDA is what quantizes the weights


# ---------------------------------------------------------------- wrapping a model

def parse_targets(targets: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if names == ("all-linear",):
        return ALL_LINEAR
    unknown = [n for n in names if n not in ALL_LINEAR + ("lm_head",)]
    if unknown or not names:
        raise UserError(f"lora_targets: unknown module name(s) {unknown or [targets]}; choose from "
                        f"{', '.join(ALL_LINEAR)}, lm_head, or all-linear")
    return names


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: identifies a base model, so an
    adapter is never loaded onto a different one."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0, targets: str = "q_proj,v_proj",
             base_dtype: str = "fp32", keep_trainable: tuple[str, ...] = ("head.", "value_head."),
             base_hash: str | None = None) -> nn.Module:
    """Wrap `targets` of `model` in place; freeze everything but the adapters (and parameters whose
    name starts with one of `keep_trainable`: a reward/value model's scalar head). Returns `model`."""
    if rank <= 0:
        raise UserError(f"lora_rank must be positive to add adapters, got {rank}")
    if base_dtype not in BASE_DTYPES:
        raise UserError(f"lora_dtype '{base_dtype}' is not one of {', '.join(BASE_DTYPES)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("this model already has LoRA adapters; merge_lora() it first or load a fresh base")
    wanted = parse_targets(targets)
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "trunk", None), "cfg", None)
    if "lm_head" in wanted and cfg is not None and cfg.tie_embeddings:
        raise UserError("lora_targets includes lm_head but this model ties lm_head to the embedding; "
                        "drop lm_head from lora_targets")
    base_hash = base_hash or weights_hash(model)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full.startswith(keep_trainable):
                continue
            if child_name in wanted:
                setattr(parent, child_name, LoRALinear(child, rank, alpha, base_dtype))
                wrapped += 1
            elif base_dtype != "fp32" and child_name in ALL_LINEAR:
                # a frozen non-target Linear: hold it in the low precision too (rank 0 = no adapters)
                setattr(parent, child_name, LoRALinear(child, 0, alpha, base_dtype))
    if not wrapped:
        raise UserError(f"lora_targets {targets!r} matched no Linear layer of this model; "
                        f"choose from {', '.join(ALL_LINEAR)}")
    for name, p in model.named_parameters():
        if ".lora_" in name or name.startswith(keep_trainable):
            p.requires_grad_(True)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": ",".join(wanted), "base_dtype": base_dtype,
                         "base_hash": base_hash}
    return model


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """What a stage calls: add adapters per TrainConfig's lora_* fields (rank 0: return `model` as is)."""
    if not getattr(cfg, "lora_rank", 0):
        return model
    return add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dtype)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.rank]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what training changed)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def lora_meta(model: nn.Module) -> dict | None:
    """The adapters' settings for a checkpoint's meta (None when the model has no adapters)."""
    return dict(model.lora_config) if getattr(model, "lora_config", None) else None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place: the
    result saves and exports as an ordinary checkpoint. Returns `model`."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                child._check_mergeable()
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                plain.weight = nn.Parameter(child.weight.detach().to(child.orig_dtype))
                if child.bias is not None:
                    plain.bias = nn.Parameter(child.bias.detach().to(child.orig_dtype))
                setattr(parent, child_name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge (True) or unmerge (False) every adapter, keeping the wrappers."""
    for layer in lora_layers(model):
        layer.merge() if merged else layer.unmerge()


# ---------------------------------------------------------------- adapters on disk

def save_adapter(model: nn.Module, out: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter.safetensors + adapter.json (settings and the base's weights hash) to folder
    `out`, whole or not at all. `state`: the model's whole state dict, where the model itself holds
    only its shards (FSDP)."""
    meta = lora_meta(model)
    if meta is None:
        raise UserError("this model has no LoRA adapters to save; train with --lora-rank > 0")
    if any(layer.merged for layer in lora_layers(model)):
        raise UserError("the adapters are merged into the base; set_merged(model, False) before saving them")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        adapters = lora_state_dict(model) if state is None else {k: v for k, v in state.items() if ".lora_" in k}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapters.items()}
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={"format": ADAPTER_FORMAT})
        (tmp / "adapter.json").write_text(json.dumps({"format": ADAPTER_FORMAT, **meta}, indent=2), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp makes owner-only folders; share like any file
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, base_dtype: str | None = None) -> nn.Module:
    """Add the saved adapters to a plain base `model` (the one they were trained on), in place."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter.json").is_file() or not (adapter_dir / "adapter.safetensors").is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter folder (adapter.json + adapter.safetensors); "
                        "pass the folder save_adapter() wrote")
    try:
        meta = json.loads((adapter_dir / "adapter.json").read_text(encoding="utf-8"))
        tensors = load_file(str(adapter_dir / "adapter.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise UserError(f"{adapter_dir} is corrupt ({e}); save the adapter again") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{adapter_dir}/adapter.json is not a {ADAPTER_FORMAT} adapter; save it with llmforge")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("load_adapter needs the plain base model, but this one already has adapters")
    actual = weights_hash(model)
    if actual != meta["base_hash"]:
        raise UserError(f"adapter {adapter_dir} was trained on base weights {meta['base_hash'][:12]} but this "
                        f"model's weights are {actual[:12]}; load it onto the checkpoint it was trained from")
    add_lora(model, meta["rank"], meta["alpha"], meta["targets"], base_dtype or meta.get("base_dtype", "fp32"),
             base_hash=actual)
    _load_lora_tensors(model, tensors, adapter_dir)
    return model


def _load_lora_tensors(model: nn.Module, tensors: dict, where) -> None:
    expected = lora_state_dict(model)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UserError(f"adapter {where} does not fit this model (missing {missing[:2]}, unexpected {extra[:2]}); "
                        "load it onto the model it was trained for")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(f"adapter {where}: {name} has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(expected[name].shape)}; load it onto the model it was trained for")
    model.load_state_dict(tensors, strict=False)


def load_lora_checkpoint_into(model: nn.Module, weights: dict[str, torch.Tensor], meta: dict,
                              merge: bool = True) -> nn.Module:
    """Load a checkpoint saved from a LoRA-wrapped model (its config.json meta "lora" = lora_meta())
    into plain `model`: wrap, load base + adapters, and (by default) merge back to plain Linears."""
    add_lora(model, meta["rank"], meta["alpha"], meta["targets"], meta.get("base_dtype", "fp32"),
             base_hash=meta.get("base_hash", "?"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied, stored once
    if missing or unexpected:
        raise UserError(f"LoRA checkpoint does not fit this model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); load it with the config it was saved with")
    return merge_lora(model) if merge else model
