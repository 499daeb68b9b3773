"""GRPO (RLVR): group-relative policy optimization with the task verifiers as the reward, no
reward model and no value function (Shao et al. 2024, DeepSeekMath §4) -> ckpt/rl_grpo.

    llmforge rl --algo grpo --out runs/demo [--set grpo.group_size=8] [--set grpo.kl_coef=0.04]

Each rollout samples `group_size` answers to train prompts; an answer's advantage is its
verified reward normalized within its group, given to every token. RL can only amplify what the
policy already sometimes does: a group whose answers are all right (or all wrong) has zero
advantage and teaches nothing. So the rollout keeps only informative groups (DAPO's dynamic
sampling, Yu et al. 2025): it draws prompts `prompts_per_rollout` at a time, discards groups
whose G rewards are all equal, and draws again (at most `max_draws` times) until it has
`prompts_per_rollout` informative groups; if it runs out, uninformative groups fill the buffer
(they still carry the KL term). Each rollout logs the share of informative groups — the part of
the prompt distribution where pass@G > pass@1, which bounds what GRPO can gain.

Loss: the PPO clipped surrogate with those advantages + β·KL(π || π_ref) (the unbiased "k3"
estimator of DeepSeekMath eq. 4). KL to the reference is reported per response in nats
(Σ over tokens of log π - log π_ref on the rollout's own samples). The published checkpoint is
the one with the best held-out verified accuracy among the evaluations (rl.eval_every, the end,
and the initial policy).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl import common
from llmforge.stages.rl.evaluate import BestCheckpoint, policy_eval
from llmforge.stages.rl.objectives import grpo_advantages, informative_groups, masked_mean, ppo_policy_loss
from llmforge.stages.rl.rollout import RolloutBuffer, Rollouts, gather_actions
from llmforge.tasks import task_names
from llmforge.train.loop import Checkpointing, autocast, autocast_dtype, train

ALGO = "grpo"
STAGE = "rl_grpo"


@dataclass
class GRPOConfig:
    """[grpo]: GRPO's own knobs; the loop's (lr, batch_size, grad_accum, max_steps, ...) are in [rl]."""
    group_size: int = 8             # G answers sampled per prompt; advantages are normalized within them
    prompts_per_rollout: int = 8    # groups per rollout buffer (G rows each)
    ppo_epochs: int = 1             # passes over each rollout buffer, in shuffled minibatches
    kl_coef: float = 0.04           # β of the k3 KL(π || π_ref) term in the loss
    clip: float = 0.2               # ratio clip ε of the surrogate
    dynamic_sampling: bool = True   # keep only groups whose rewards differ (DAPO); False: every group drawn
    max_draws: int = 4              # dynamic sampling: at most this many draws of prompts_per_rollout prompts
    select_best: bool = True        # publish the best validation evaluation (the initial policy unless one beats
                                    # it with p < rl.select_p), not the last step
    minutes: float = -1.0           # wall-clock budget of GRPO's training; < 0: rl.minutes (shared by the algorithms)


CONFIG = GRPOConfig


def run(cfg: Config, run: RunDir, show_progress: bool = True, resume: bool = False, **_) -> dict:
    gc = cfg.grpo
    rc = dataclasses.replace(cfg.rl, minutes=gc.minutes) if gc.minutes >= 0 else cfg.rl
    ctx = common.single_process()
    tok, policy, ref = common.policy_and_reference(run, rc)
    train_dir = run.ckpt(f"{STAGE}_train")
    resume = resume and (train_dir / "train_state.json").is_file()
    best = BestCheckpoint(run, f"{STAGE}_best", tok, resume=resume, select_p=rc.select_p)
    names = task_names(cfg.tasks.names)
    pool = common.prompt_pool(names, max(gc.prompts_per_rollout * gc.max_draws // len(names) + 1, 50))
    G, max_len = gc.group_size, policy.cfg.max_seq_len
    n_groups = min(gc.prompts_per_rollout, len(pool))
    amp = autocast_dtype(rc, ctx.device)

    def make_rollout(phase: int, step: int) -> RolloutBuffer:
        order = list(range(len(pool)))
        random.Random(rc.seed * 1_000_003 + phase).shuffle(order)
        kept, spare, drawn = [], [], 0
        for draw in range(gc.max_draws if gc.dynamic_sampling else 1):
            picked = order[draw * n_groups:(draw + 1) * n_groups]
            if not picked:
                break
            groups = task_eval.sample(policy, tok, [pool[i] for i in picked], n=G, temperature=rc.temperature,
                                      max_tokens=cfg.tasks.max_new_tokens, seed=rc.seed + phase * 1_009 + draw)
            rewards = torch.tensor([[s.reward for s in row] for row in groups])
            useful = informative_groups(rewards) if gc.dynamic_sampling else torch.ones(len(groups), dtype=bool)
            for i, row, r, ok in zip(picked, groups, rewards, useful.tolist()):
                (kept if ok else spare).append((i, row, r))
            drawn += len(groups)
            if len(kept) >= n_groups:
                break
        informative = len(kept)
        kept = (kept + spare)[:n_groups]          # short of signal: all-equal groups fill the buffer
        samples = [s for _, row, _ in kept for s in row]
        rewards = torch.stack([r for _, _, r in kept])
        advantages = grpo_advantages(rewards).flatten()
        buf = RolloutBuffer.from_samples(phase, samples, [i for i, _, _ in kept for _ in range(G)],
                                         rewards.flatten(), tok.eot_id, max_len)
        batch = buf.batch(torch.arange(len(buf)))
        with torch.no_grad(), autocast(ctx.device, amp):
            old_logp, entropy = gather_actions(policy(batch["input_ids"]), batch)
            ref_logp, _ = gather_actions(ref(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        run.log(STAGE, step=step, rollout=phase, reward=float(rewards.mean()), verified_reward=float(rewards.mean()),
                kl=float(((old_logp - ref_logp) * mask).sum(1).mean()), length=float(mask.sum(1).mean()),
                entropy=float(masked_mean(entropy, mask)), groups_drawn=drawn,
                informative_share=informative / max(drawn, 1), informative_in_buffer=min(informative, n_groups) / n_groups,
                solved_groups=float((rewards.max(1).values >= 1).float().mean()))
        return dataclasses.replace(buf, old_logp=old_logp, ref_logp=ref_logp,
                                   advantages=advantages[:, None].expand_as(mask) * mask)

    rollouts = Rollouts(run.ckpt(f"{STAGE}_rollouts"), n_groups * G, rc.batch_size, rc.grad_accum, gc.ppo_epochs,
                        rc.seed, make_rollout, resume=resume, ckpt_dir=train_dir)
    seen = {"step": 0}

    def get_batch(step, micro, ctx):
        seen["step"] = step + 1
        return rollouts(step, micro)

    def loss_fn(model, batch):
        logp, _ = gather_actions(model(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        pg_loss, clip_frac = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, gc.clip)
        # DeepSeekMath eq. 4: D_KL ≈ π_ref/π - log(π_ref/π) - 1, always >= 0
        log_ratio = batch["ref_logp"] - logp
        kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
        loss = pg_loss + gc.kl_coef * kl
        return loss, {"pg_loss": pg_loss.detach(), "kl_k3": kl.detach(), "clip_frac": clip_frac.detach()}

    def evaluate(model, step: int) -> dict:
        scored: list = []
        out = policy_eval(model, ref, tok, names, rc.eval_per_task, cfg.tasks.max_new_tokens, rc.seed, scored=scored,
                          memo=run if step == 0 else None)
        if gc.select_best:
            best.offer(model, scored, step, {"algo": ALGO})
        return out

    if gc.select_best and not resume:
        policy.eval()
        with torch.no_grad(), autocast(ctx.device, amp):
            run.log(STAGE, step=0, **evaluate(policy, 0))
        policy.train()
    tc = dataclasses.replace(rc, seq_len=max_len)
    ckpt = Checkpointing(train_dir, "rl_train", policy.cfg, tok, {"algo": ALGO})
    summary = train(policy, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=lambda m: evaluate(m, seen["step"]), resume=resume, show_progress=show_progress)
    rollouts.cleanup()
    meta = {"algo": ALGO, "init": rc.init, "preset": cfg.preset}
    if gc.select_best and best.step >= 0:
        best.load_into(policy)
        meta.update(selection_acc=best.best, selection_step=best.step)
        summary = {**summary, "selection_acc": best.best, "selection_step": best.step}
    common.publish_policy(run, STAGE, policy, tok, meta)
    return summary
