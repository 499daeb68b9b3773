"""GRPO: group-relative policy optimization with the task verifiers as the reward, no reward
model and no value function (Shao et al. 2024, DeepSeekMath §4) -> ckpt/rl_grpo.

    llmforge rl --algo grpo --out runs/demo [--set rl.group_size=8] [--set rl.kl_coef=0.04]

Each rollout samples `group_size` answers to each of `prompts_per_rollout` train prompts; an
answer's advantage is its verified reward normalized within its group, given to every token.
Loss: the PPO clipped surrogate with those advantages + β·KL(π || π_ref) (the unbiased "k3"
estimator of DeepSeekMath eq. 4).
"""
from __future__ import annotations

import dataclasses
import random

import torch

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl import common
from llmforge.stages.rl.objectives import grpo_advantages, masked_mean, ppo_policy_loss
from llmforge.tasks import task_names
from llmforge.train.loop import Checkpointing, autocast, autocast_dtype, train

ALGO = "grpo"
STAGE = "rl_grpo"


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    rc = cfg.rl
    ctx = common.single_process()
    tok, policy, ref = common.policy_and_reference(run, rc)
    names = task_names(cfg.sft.tasks)
    pool = common.prompt_pool(names, max(rc.prompts_per_rollout, 50))
    rng = random.Random(rc.seed)
    G = rc.group_size
    state: dict = {"phase": -1}

    def make_rollout(phase: int, step: int) -> dict:
        items = rng.sample(pool, min(rc.prompts_per_rollout, len(pool)))
        groups = task_eval.sample(policy, tok, items, n=G, temperature=rc.temperature,
                                  max_tokens=rc.max_new_tokens, seed=rc.seed + phase)
        samples = [s for row in groups for s in row]
        rewards = torch.tensor([[s.reward for s in row] for row in groups])
        advantages = grpo_advantages(rewards).flatten()
        batch = common.rollout_batch(samples, tok.eot_id, policy.cfg.max_seq_len)
        with torch.no_grad(), autocast(ctx.device, autocast_dtype(rc, ctx.device)):
            old_logp, entropy = common.gather_actions(policy(batch["input_ids"]), batch)
            ref_logp, _ = common.gather_actions(ref(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        run.log(STAGE, step=step, rollout=phase, reward=float(rewards.mean()),
                kl=float(((old_logp - ref_logp) * mask).sum(1).mean()), length=float(mask.sum(1).mean()),
                entropy=float(masked_mean(entropy, mask)), verified_reward=float(rewards.mean()),
                solved_groups=float((rewards.max(1).values >= 1).float().mean()))
        return {**batch, "old_logp": old_logp, "ref_logp": ref_logp,
                "advantages": advantages[:, None].expand_as(mask) * mask}

    def get_batch(step, micro, ctx):
        phase = step // rc.ppo_epochs
        if state["phase"] != phase:
            state["phase"], state["batch"] = phase, make_rollout(phase, step)
        return state["batch"]

    def loss_fn(model, batch):
        logp, _ = common.gather_actions(model(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        pg_loss, clip_frac = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, rc.clip)
        # DeepSeekMath eq. 4: D_KL ≈ π_ref/π - log(π_ref/π) - 1, always >= 0
        log_ratio = batch["ref_logp"] - logp
        kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
        loss = pg_loss + rc.kl_coef * kl
        return loss, {"pg_loss": pg_loss.item(), "kl_k3": kl.item(), "clip_frac": clip_frac.item()}

    def eval_fn(model):
        return common.policy_eval(model, ref, tok, names, rc.eval_per_task, rc.max_new_tokens, rc.seed)

    tc = dataclasses.replace(rc, seq_len=policy.cfg.max_seq_len)
    ckpt = Checkpointing(run.ckpt(f"{STAGE}_train"), "rl_train", policy.cfg, tok, {"algo": ALGO})
    summary = train(policy, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=eval_fn, show_progress=show_progress)
    common.publish_policy(run, STAGE, policy, tok, {"algo": ALGO, "init": rc.init, "preset": cfg.preset})
    return summary
