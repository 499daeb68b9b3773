"""PPO from human-preference rewards (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022) -> ckpt/rl_ppo.

    llmforge rl --algo ppo --out runs/demo [--set rl.kl_coef=0.05] [--set rl.kl_target=6]

Every `ppo_epochs` optimizer steps the policy writes a fresh rollout through the engine:
  score    combined reward model (helpfulness / safety, Llama 2), minus a penalty when the
           response never ended
  reward   per token: -β·(log π - log π_ref), plus the score on the last token
  GAE      advantages and returns from a value head on the policy's own trunk; advantages whitened
  loss     clipped policy loss + vf_coef · clipped value loss (+ ptx_coef · pretraining LM loss)
The loop (train/loop.py) does the optimizer steps; the engine (infer/engine.py) does the sampling.
"""
from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl import common
from llmforge.stages.rl.objectives import (AdaptiveKL, FixedKL, gae, kl_penalized_rewards, masked_mean,
                                           ppo_policy_loss, ppo_value_loss, whiten)
from llmforge.tasks import task_names
from llmforge.train.loop import Checkpointing, autocast, autocast_dtype, train

ALGO = "ppo"
STAGE = "rl_ppo"


class PolicyWithValue(nn.Module):
    """The policy transformer plus a scalar value head on its final hidden states."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.cfg = policy.cfg
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx):
        h = self.policy.hidden_states(idx)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()

    def flops_per_token(self, seq_len=None):
        return self.policy.flops_per_token(seq_len)


def ptx_batches(run: RunDir, rc, seq_len: int):
    """Pretraining batches for the PPO-ptx term, or None when it is off."""
    if rc.ptx_coef <= 0:
        return None
    from llmforge.data.shards import TokenShards
    data = TokenShards(run.data, "train")

    def get(step):
        g = torch.Generator().manual_seed(rc.seed * 7 + step)
        return data.sample_batch(rc.batch_size, seq_len, g)
    return get


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    rc = cfg.rl
    ctx = common.single_process()      # rollouts are generated in-process; one rank
    tok, policy, ref = common.policy_and_reference(run, rc)
    reward_model = common.load_reward(run, tok, cfg.rm.safety_threshold)
    model = PolicyWithValue(policy)
    names = task_names(cfg.sft.tasks)
    pool = common.prompt_pool(names, max(rc.prompts_per_rollout, 50))
    kl_ctl = AdaptiveKL(rc.kl_coef, rc.kl_target, rc.kl_horizon) if rc.kl_target > 0 else FixedKL(rc.kl_coef)
    ptx = ptx_batches(run, rc, min(rc.seq_len, policy.cfg.max_seq_len))
    rng = random.Random(rc.seed)
    state: dict = {"phase": -1}

    def make_rollout(phase: int, step: int) -> dict:
        items = rng.sample(pool, min(rc.prompts_per_rollout, len(pool)))
        samples = [row[0] for row in task_eval.sample(policy, tok, items, n=1, temperature=rc.temperature,
                                                       max_tokens=rc.max_new_tokens, seed=rc.seed + phase)]
        batch = common.rollout_batch(samples, tok.eot_id, policy.cfg.max_seq_len)
        seqs = [(s.prompt_ids + s.completion.tokens)[:policy.cfg.max_seq_len] for s in samples]
        score = reward_model(seqs, [s.item.safety_relevant for s in samples])
        ended = torch.tensor([s.ended for s in samples])
        score = score - rc.no_end_penalty * (~ended).float()
        # same precision as the training forward, so the first PPO ratio is exactly 1
        with torch.no_grad(), autocast(ctx.device, autocast_dtype(rc, ctx.device)):
            logits, values = model(batch["input_ids"])
            old_logp, entropy = common.gather_actions(logits, batch)
            old_values = values[torch.arange(len(samples))[:, None], batch["act_pos"]]
            ref_logp, _ = common.gather_actions(ref(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values * mask, mask, rc.gamma, rc.lam)
        kl_per_response = float(kl.sum(1).mean())
        run.log(STAGE, step=step, rollout=phase, reward=float(score.mean()), kl=kl_per_response,
                kl_coef=kl_ctl.value, length=float(mask.sum(1).mean()),
                entropy=float(masked_mean(entropy, mask)), verified_reward=common.mean(s.reward for s in samples),
                ended=float(ended.float().mean()))
        kl_ctl.update(kl_per_response, len(samples))
        return {**batch, "old_logp": old_logp, "old_values": old_values * mask,
                "advantages": whiten(advantages, mask), "returns": returns}

    def get_batch(step, micro, ctx):
        phase = step // rc.ppo_epochs
        if state["phase"] != phase:
            state["phase"], state["batch"] = phase, make_rollout(phase, step)
        batch = dict(state["batch"])
        if ptx is not None:
            batch["ptx_x"], batch["ptx_y"] = ptx(step)
        return batch

    def loss_fn(model, batch):
        logits, values = model(batch["input_ids"])
        logp, _ = common.gather_actions(logits, batch)
        v = values[torch.arange(len(values))[:, None], batch["act_pos"]]
        mask = batch["act_mask"]
        pg_loss, clip_frac = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, rc.clip)
        vf_loss = ppo_value_loss(v, batch["old_values"], batch["returns"], mask, rc.value_clip)
        loss = pg_loss + rc.vf_coef * vf_loss
        metrics = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "clip_frac": clip_frac.item()}
        if "ptx_x" in batch:   # InstructGPT eq. 2, the γ·E_pretrain[log π] term
            from llmforge.model.transformer import token_cross_entropy
            ptx_logits, _ = model(batch["ptx_x"])
            ptx_loss = token_cross_entropy(ptx_logits, batch["ptx_y"])
            loss = loss + rc.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss.item()
        return loss, metrics

    def eval_fn(model):
        return common.policy_eval(model.policy, ref, tok, names, rc.eval_per_task, rc.max_new_tokens, rc.seed)

    tc = dataclasses.replace(rc, seq_len=policy.cfg.max_seq_len)
    ckpt = Checkpointing(run.ckpt(f"{STAGE}_train"), "rl_train", policy.cfg, tok, {"algo": ALGO})
    summary = train(model, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=eval_fn, show_progress=show_progress)
    common.publish_policy(run, STAGE, policy, tok, {"algo": ALGO, "init": rc.init, "preset": cfg.preset})
    return summary
