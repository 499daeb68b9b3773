"""THE training loop. Pretraining, SFT, reward models, DPO and PPO/GRPO updates all run here.

A stage hands over:
    model      the nn.Module to train (its trainable parameters are optimized)
    get_batch  get_batch(step, micro, ctx) -> dict of tensors; must be a pure function of its
               arguments (and of the stage's own seeded state) so that resume is exact and every
               DDP rank reads its own rows of the same global batch
    loss_fn    loss_fn(model, batch) -> (loss, {"name": float or 0-d tensor}); metrics are averaged
               (return tensors, not .item(): the loop reads them only on logging steps; a 1-D
               tensor is logged as a list)
    ckpt       Checkpointing(dir, kind, model_cfg, tokenizer, meta): where and how to save
and optionally eval_fn(model) -> {"val_loss": ..., ...} and sample_fn(model) -> str.
loss_fn must call the model through forward (model(...)), not other methods, so that DDP's
gradient hooks fire when the model is wrapped.

Mixture-of-experts layers (model/moe.py) record their router's auxiliary losses in every training
forward; the loop adds them to the stage's loss and logs per layer expert load, dropped-token share
and router entropy, so every stage trains MoE models without knowing it.

The loop owns: AdamW, warmup + cosine/WSD schedule, gradient accumulation, clipping,
bf16 autocast, torch.compile, DDP or FSDP2 (cfg.parallel, train/distributed.py), activation
checkpointing, LoRA (cfg.lora_rank > 0 wraps the model's Linears), the budget (steps / tokens / minutes), metrics.jsonl,
the progress bar (tokens/s, MFU, ETA), periodic atomic checkpoints and exact resume.

Under FSDP (cfg.parallel = "fsdp") every rank holds 1/world of the parameters, gradients and optimizer
state, and checkpoints are sharded (train/checkpoint.py). eval_fn and sample_fn then run inside
distributed.gathered(): the whole parameters on every rank for the call, so they may use the
engine and run on rank 0 alone, as under DDP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from llmforge.config import ModelConfig, TrainConfig
from llmforge.errors import UserError
from llmforge.model.lora import apply_lora, lora_meta, save_adapter
from llmforge.model.moe import moe_layers, router_losses
from llmforge.run import RunDir
from llmforge.train import checkpoint as ckpt_io
from llmforge.train.distributed import (DistContext, all_reduce_mean, checkpoint_blocks, fsdp_setup, gathered,
                                        is_sharded, skip_grad_sync)
from llmforge.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class Checkpointing:
    dir: Path
    kind: str
    model_cfg: ModelConfig
    tokenizer: Any = None
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------ precision and peak

def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX); else fp32."""
    if cfg.dtype == "fp32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype != "auto":
        raise UserError(f"train dtype '{cfg.dtype}' is not one of auto, bf16, fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_PEAK: dict = {}


def measured_peak_flops(device: torch.device, dtype: torch.dtype | None, n: int = 1024) -> float:
    """This machine's dense matmul FLOP/s in the training dtype, measured once per process."""
    key = (str(device), dtype)
    if key not in _PEAK:
        a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
        a @ b
        best = 0.0
        for _ in range(3):  # the best of three short trials: other processes only slow a trial down
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.15:
                a @ b
                reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
        _PEAK[key] = best
    return _PEAK[key]


# ------------------------------------------------------------------ resume

LEGACY_ADAMW = ("step", "exp_avg", "exp_avg_sq")


def load_train_state(ck: Checkpointing, model: torch.nn.Module, optimizer) -> dict | None:
    """Weights, optimizer state and RNG from ck.dir; a sharded checkpoint loads on any world size
    and into a sharded or a whole model (torch.distributed.checkpoint reshards by name)."""
    folder = Path(ck.dir)
    if not (folder / "train_state.json").is_file():
        return None
    config = ckpt_io.read_config(folder, sharded_ok=True)
    if config.get("model") != dataclasses.asdict(ck.model_cfg):
        raise UserError(f"cannot resume from {folder}: it was trained with a different model config; "
                        "resume with the same config or start a new --out directory")
    state = json.loads((folder / "train_state.json").read_text())
    from safetensors.torch import load_file
    tensors = load_file(str(folder / "train_state.safetensors"))
    if ckpt_io.is_sharded_checkpoint(folder):
        ckpt_io.load_sharded(folder, model, optimizer)
        torch.set_rng_state(tensors["rng.cpu"])
        return state
    if is_sharded(model):
        raise UserError(f"cannot resume {folder} with parallel=fsdp: it was saved without sharding "
                        "(parallel=ddp); resume it with --set <stage>.parallel=ddp")
    ckpt_io.load_into(model, ckpt_io.load_weights(folder), folder)
    opt_state = optimizer.state_dict()
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "opt":           # opt.<param id>.<state name>
            opt_state["state"].setdefault(int(parts[1]), {})[parts[2]] = value
        elif parts[0] in LEGACY_ADAMW:  # exp_avg.<param id>: checkpoints written before Muon
            opt_state["state"].setdefault(int(parts[1]), {})[parts[0]] = value
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.cpu"])
    return state


def train_state_of(optimizer, step: int, tokens: int, elapsed: float, planned_steps: int | None = None) -> dict:
    """Optimizer moments, schedule position, RNG and loader position (the step: batches are a
    pure function of it) as flat tensors + JSON, for safetensors. optimizer=None: a sharded
    checkpoint, whose optimizer state goes to its shards."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    for pid, state in (optimizer.state_dict()["state"] if optimizer is not None else {}).items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(value).float() if name == "step" else value
    plan = {"planned_steps": planned_steps} if planned_steps else {}
    return {"tensors": tensors, "json": {"step": step, "tokens": tokens, "elapsed": elapsed, **plan}}


# ------------------------------------------------------------------ the loop

def plan_steps(step: int, now: float, per_step: float, budget_s: float, max_steps: int, ctx: DistContext,
               eval_s: float = 0.0, eval_every: int = 0) -> int:
    """A minutes budget turned into a step count: the steps that fit what is left of it (`now`
    seconds are spent) at `per_step` seconds each, at most max_steps. The periodic evaluations
    are part of the budget: an evaluation that took eval_s, every eval_every steps, adds
    eval_s / eval_every to each step, and one more runs after the last step. (Planned on step
    time alone, the cpu speedrun's 8 minutes of pretraining took 8.9.) Every rank takes the
    smallest plan, so all stop at the same step."""
    cost = per_step + (eval_s / eval_every if eval_every else 0.0)
    total = min(max_steps, step + max(int((budget_s - now - eval_s) / max(cost, 1e-9)), 0))
    if ctx.enabled:
        t = torch.tensor([float(total)], device=ctx.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        total = int(t.item())
    return total


def train(model: torch.nn.Module, cfg: TrainConfig, run: RunDir, *, stage: str, ctx: DistContext,
          get_batch: Callable, loss_fn: Callable, ckpt: Checkpointing,
          eval_fn: Callable | None = None, sample_fn: Callable | None = None,
          resume: bool = False, show_progress: bool = True) -> dict:
    device = ctx.device
    if cfg.lora_rank and lora_meta(model) is None:  # --set STAGE.lora_rank=8: train adapters only
        model = apply_lora(model, cfg)
    if cfg.parallel not in ("ddp", "fsdp"):
        raise UserError(f"{stage}.parallel='{cfg.parallel}' is not one of ddp, fsdp; set --set {stage}.parallel=fsdp "
                        "to shard the model over the ranks, or ddp to replicate it")
    raw_model = model.to(device)
    lora = lora_meta(raw_model)
    if lora:
        ckpt.meta["lora"] = lora
    amp = autocast_dtype(cfg, device)
    if cfg.activation_checkpointing:
        checkpoint_blocks(raw_model)
    sharded_ckpt = cfg.parallel == "fsdp"     # the checkpoint format follows the setting, on any world size
    if sharded_ckpt and ctx.enabled:          # in place: parameters become DTensor shards, before the optimizer
        fsdp_setup(raw_model, ctx, amp)
    optimizer = build_optimizer(raw_model, cfg, device.type)
    torch.manual_seed(cfg.seed)

    step, tokens, prior_elapsed = 0, 0, 0.0
    planned = None   # the step count fixed by plan_after (a minutes budget turned into steps)
    if resume:
        state = load_train_state(ckpt, raw_model, optimizer)
        if state is None:
            raise UserError(f"--resume: {ckpt.dir} has no train_state to resume from; "
                            "run without --resume to start fresh")
        step, tokens, prior_elapsed = state["step"], state["tokens"], state["elapsed"]
        planned = state.get("planned_steps")

    model = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if ctx.enabled and not is_sharded(raw_model):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    budget_s = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    if planned:                  # resumed after its plan: the same steps, whatever this machine's speed
        cfg.max_steps, budget_s = planned, math.inf
    flops_per_token = raw_model.flops_per_token(cfg.seq_len) if hasattr(raw_model, "flops_per_token") else \
        raw_model.trunk.flops_per_token(cfg.seq_len)
    peak = measured_peak_flops(device, amp) * ctx.world

    def progress() -> float:
        shares = [step / cfg.max_steps if cfg.max_steps else 0.0,
                  tokens / cfg.max_tokens if cfg.max_tokens else 0.0,
                  elapsed() / budget_s if budget_s < math.inf else 0.0]
        return max(shares)

    t_start = time.perf_counter()

    def elapsed() -> float:
        return prior_elapsed + time.perf_counter() - t_start

    def save(final: bool = False, complete: bool = False) -> None:
        # "complete" marks the end of the budget: the speedrun skips such stages
        meta = {**ckpt.meta, "stage": stage, "step": step, "tokens": tokens, "complete": complete}
        if sharded_ckpt:  # every rank writes its shards; the whole weights (for the next stage) at the end
            ckpt_io.save_checkpoint(ckpt.dir, raw_model, kind=ckpt.kind, model_cfg=ckpt.model_cfg,
                                    tokenizer=ckpt.tokenizer, meta=meta, sharded_optimizer=optimizer,
                                    full_weights=final, train_state=train_state_of(None, step, tokens, elapsed(), planned))
        elif ctx.is_main:
            ckpt_io.save_checkpoint(ckpt.dir, raw_model, kind=ckpt.kind, model_cfg=ckpt.model_cfg,
                                    tokenizer=ckpt.tokenizer, meta=meta,
                                    train_state=train_state_of(optimizer, step, tokens, elapsed(), planned))

    def evaluate() -> dict:
        if eval_fn is None:
            return {}
        raw_model.eval()
        with torch.no_grad(), autocast(device, amp), gathered(raw_model):
            out = eval_fn(raw_model)
        raw_model.train()
        out = {k: all_reduce_mean(v, ctx) for k, v in out.items()}
        if ctx.is_main:
            run.log(stage, step=step, tokens=tokens, **out)
        return out

    def grad_sync(sync: bool):  # off for all but a step's last micro-batch; DDP reads it in forward, FSDP in backward
        return contextlib.nullcontext() if sync else skip_grad_sync(raw_model if is_sharded(raw_model) else model)

    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the step, save, exit: nothing already trained is lost
        stop["signal"] = signum

    # every rank must stop at the same step (FSDP's saves are collective; a DDP rank that stopped
    # alone would leave the others waiting in an all-reduce): each rank listens, and one scalar
    # all-reduce per step shares the first signal and the first rank out of its minutes budget
    agree = ctx.enabled
    old_handler = signal.signal(signal.SIGTERM, on_signal)

    def keep_going() -> bool:
        if not agree:
            return progress() < 1.0 and stop["signal"] is None
        flags = torch.tensor([float(stop["signal"] or 0), float(progress() >= 1.0)], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop["signal"] = int(flags[0]) or None
        return stop["signal"] is None and not flags[1]
    bar = tqdm(total=cfg.max_steps, initial=step, desc=stage, unit="step", dynamic_ncols=True,
               disable=not (show_progress and ctx.is_main))
    last_eval: dict = {}
    evaluated_at = None   # the step the last evaluation ran at (one per step at most)
    window_t, window_tokens = time.perf_counter(), 0
    routed = moe_layers(raw_model)   # MoE layers: their router losses join the loss, their stats the log
    for _, layer in routed:          # a stage's own forwards before the loop are not this loop's
        layer.records.clear()
    raw_model.train()
    plan_from = (step, elapsed())   # the plan times the steps after the first few (allocator, caches)
    try:
        while keep_going():
            lr = lr_at(step, progress(), cfg)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)  # stays on the device: no sync per micro-step
            sums: dict[str, float] = {}
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in get_batch(step, micro, ctx).items()}
                sync = micro == cfg.grad_accum - 1 or not ctx.enabled
                with grad_sync(sync), autocast(device, amp):
                    loss, metrics = loss_fn(model, batch)
                total = loss
                if routed:  # the auxiliary losses the MoE layers' forwards recorded (model/moe.py)
                    aux, router_metrics = router_losses(routed)
                    total, metrics = loss + aux, {**metrics, **router_metrics}
                with grad_sync(sync):
                    (total / cfg.grad_accum).backward()
                for _, layer in routed:  # activation checkpointing's recompute records the routing again
                    layer.records.clear()
                loss_sum += loss.detach().float() / cfg.grad_accum
                for k, v in metrics.items():
                    # kept as (detached) tensors: read only on logging steps, with the loss
                    sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
                # tokens: the batch's input ids, or what a batch without them counts (image patches)
                step_tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else int(batch.get("tokens", 0))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in raw_model.parameters() if p.requires_grad],
                cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; the norm of the whole gradient
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens * ctx.world
            window_tokens += step_tokens * ctx.world
            bar.update(1)
            if cfg.plan_after and budget_s < math.inf and not planned:   # a minutes budget still to plan
                if step == min(10, cfg.plan_after // 2):
                    plan_from = (step, elapsed())
                if step == cfg.plan_after:
                    per_step = (elapsed() - plan_from[1]) / max(step - plan_from[0], 1)
                    eval_s = 0.0
                    if eval_fn and cfg.eval_every:   # time one evaluation: the plan pays for them too
                        eval_s = -elapsed()
                        last_eval, evaluated_at = evaluate(), step
                        eval_s += elapsed()
                    planned = plan_steps(step, elapsed(), per_step, budget_s, cfg.max_steps, ctx,
                                         eval_s=eval_s, eval_every=cfg.eval_every)
                    cfg.max_steps, budget_s, bar.total = planned, math.inf, planned
                    if ctx.is_main:
                        run.log(stage, step=step, planned_steps=planned, elapsed=round(elapsed(), 2))

            logging_step = step % cfg.log_every == 0 or step == 1
            if logging_step or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                # the one host sync of a step, and only on steps that log or save
                sums = {k: v.tolist() if torch.is_tensor(v) and v.dim() else float(v) for k, v in sums.items()}
                sums["loss"] = float(loss_sum)
                if not math.isfinite(sums["loss"]):
                    raise RuntimeError(f"{stage}: loss became {sums['loss']} at step {step}; lower the lr "
                                       "or check the data")
            if logging_step:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                mfu = tok_s * flops_per_token / peak
                values = {k: all_reduce_mean(v, ctx) for k, v in sums.items()}
                if ctx.is_main:
                    run.log(stage, step=step, tokens=tokens, lr=lr, grad_norm=float(grad_norm),
                            tok_per_s=round(tok_s, 1), mfu=round(mfu, 4), elapsed=round(elapsed(), 2), **values)
                    post = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tok_s:,.0f}", "mfu": f"{mfu:.0%}"}
                    if "val_loss" in last_eval:
                        post["val"] = f"{last_eval['val_loss']:.3f}"
                    bar.set_postfix(post)
                # time budgets move the finish line: show the projected number of steps
                if budget_s < math.inf and progress() > 0:
                    bar.total = max(step, int(step / progress()))
            if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and evaluated_at != step:
                last_eval, evaluated_at = evaluate(), step
            if sample_fn and cfg.sample_every and step % cfg.sample_every == 0:
                raw_model.eval()
                with torch.no_grad(), autocast(device, amp), gathered(raw_model):
                    if ctx.is_main:
                        run.log(stage, step=step, sample=sample_fn(raw_model))
                raw_model.train()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save()
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if eval_fn and evaluated_at != step and (not cfg.eval_every or step % cfg.eval_every):
        last_eval = evaluate()
    save(final=True, complete=stop["signal"] is None)
    if lora and ctx.is_main:  # the small file: adapters alone, with the hash of their base
        # FSDP: from the whole weights the final checkpoint just gathered
        whole = ckpt_io.load_weights(ckpt.dir) if is_sharded(raw_model) else None
        save_adapter(raw_model, run.root / "adapters" / stage, state=whole)
    summary = {"steps": step, "tokens": tokens, "elapsed_s": round(elapsed(), 2), **last_eval}
    if ctx.is_main:
        run.log(stage, event="done", **summary)
    if stop["signal"] is not None:
        raise SystemExit(f"{stage}: stopped by signal {stop['signal']} at step {step}; checkpoint saved, "
                         "continue with --resume")
    return summary
