"""What the RL stages share: the policy and its frozen reference, per-sequence
log-probabilities, publishing a policy.

Loading a run's checkpoints and tokenizer lives in train/checkpoint.py, padded batches in
stages/common.py (both shared with SFT, the reward models and the eval stage); rollout tensors
in rollout.py, rewards in rewards.py, held-out policy evaluation in evaluate.py.
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F

from llmforge.run import RunDir
from llmforge.train import checkpoint as ckpt_io
from llmforge.train.distributed import DistContext

# ---------------------------------------------------------------- the policy


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy (reference policy, reward models)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- tensors


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for every position; logits (B, T, V), targets (B, T)."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def sequence_logprob(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of the masked (assistant) tokens of each row."""
    logits = model(batch["input_ids"])
    return (token_logprobs(logits, batch["targets"]) * batch["loss_mask"]).sum(1)


# ---------------------------------------------------------------- misc


def policy_and_reference(run: RunDir, rc):
    """(tokenizer, policy to train, frozen copy as the KL reference) for an RL stage; the
    policy starts from ckpt/<rl.init> and trains only its top rl.train_layers when set."""
    tok = ckpt_io.load_run_tokenizer(run)
    policy, _ = ckpt_io.load_run_checkpoint(run, rc.init, ("sft", "rl"), tok, f"run `llmforge sft --out {run.root}` first")
    ref = frozen(policy)
    trainable_top_layers(policy, rc.train_layers)
    return tok, policy, ref


def publish_policy(run: RunDir, stage: str, model, tok, meta: dict) -> None:
    """Write the trained policy as an ordinary "rl" checkpoint (a plain Transformer) in
    ckpt/<stage>, kept for the arena, and in ckpt/rl, the run's latest RL policy."""
    for folder in (stage, "rl"):
        ckpt_io.save_checkpoint(run.ckpt(folder), model, kind="rl", model_cfg=model.cfg, tokenizer=tok, meta=meta)


def single_process() -> DistContext:
    from llmforge.train.distributed import pick_device
    return DistContext(device=pick_device())


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def trainable_top_layers(model, k: int) -> None:
    """Freeze everything but the top k transformer layers and the final norm (InstructGPT-style
    partial fine-tuning). With tied embeddings the output head is the embedding and stays frozen."""
    if k <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers[-k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in model.norm.parameters():
        p.requires_grad_(True)
    if not model.cfg.tie_embeddings:
        model.lm_head.weight.requires_grad_(True)


def prompt_pool(names: list[str], per_task: int, offset: int = 700_000):
    from llmforge.tasks import get_task
    return [item for n in names for item in get_task(n).train_items(per_task, offset=offset)]
