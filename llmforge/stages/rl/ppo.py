"""PPO against the learned reward models (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019)
-> ckpt/rl_ppo.

    llmforge rl --algo ppo --out runs/demo [--set ppo.kl_coef=0.05] [--set ppo.kl_sweep=0.01,0.05,0.2]

Each rollout (rollout.py) samples one answer to each of `ppo.prompts_per_rollout` train prompts:
  score    combined reward model (helpfulness / safety, Llama 2), minus a penalty when the
           response never ended
  reward   per token: -β·(log π - log π_ref), plus the score on the last token
  GAE      advantages and returns from a value head (model/heads.py) on the policy's own trunk;
           advantages whitened over the buffer
  loss     clipped policy loss + vf_coef · clipped value loss (+ ptx_coef · pretraining LM loss),
           ppo_epochs passes over the buffer in shuffled minibatches of rl.batch_size × rl.grad_accum
The loop (train/loop.py) does the optimizer steps; the engine (infer/engine.py) does the sampling.

The reward model is a proxy: the stage never trusts it to pick the result. The held-out
evaluations along the run (ppo.curve_points of them, plus the initial policy) are points of the
over-optimisation curve (overopt.py: RM reward and verified accuracy against KL), and the
published checkpoint is the one with the best held-out verified accuracy, which may be the
initial policy itself. ppo.kl_sweep trains one policy per KL coefficient and publishes the best.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

import torch

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.model.heads import PolicyWithValue
from llmforge.run import RunDir
from llmforge.stages.rl import common, overopt
from llmforge.stages.rl.evaluate import BestCheckpoint, policy_eval
from llmforge.stages.rl.objectives import (AdaptiveKL, FixedKL, gae, kl_penalized_rewards, masked_mean,
                                           ppo_policy_loss, ppo_value_loss, whiten)
from llmforge.stages.rl.rewards import load_reward, rm_scores
from llmforge.stages.rl.rollout import RolloutBuffer, Rollouts, gather_actions
from llmforge.tasks import task_names
from llmforge.train.checkpoint import load_run_checkpoint, load_run_tokenizer
from llmforge.train.loop import Checkpointing, autocast, autocast_dtype, train

ALGO = "ppo"
STAGE = "rl_ppo"


@dataclass
class PPOConfig:
    """[ppo]: PPO's own knobs; the loop's (lr, batch_size, grad_accum, max_steps, ...) are in [rl]."""
    prompts_per_rollout: int = 16   # responses per rollout (one per prompt): the rows of the buffer
    ppo_epochs: int = 2             # passes over each rollout buffer, in shuffled minibatches
    kl_coef: float = 0.05           # β of the per-token KL penalty -β·(log π - log π_ref)
    kl_target: float = 0.0          # > 0: adapt β toward this KL per response (Ziegler et al. 2019 §2.2)
    kl_horizon: int = 10000         # adaptive KL: responses over which β moves by at most 20%
    kl_sweep: str = ""              # e.g. "0.01,0.05,0.2": one PPO run per β, each a curve; the best is published
    curve_points: int = 3           # held-out evaluations along a run (plus one of the initial policy); 0 = at the end only
    clip: float = 0.2               # ratio clip ε of the policy loss
    value_clip: float = 0.2         # clip of the value update around V_old
    vf_coef: float = 0.5            # weight of the value loss
    gamma: float = 1.0              # GAE discount
    lam: float = 0.95               # GAE λ
    no_end_penalty: float = 1.0     # subtracted from the score of responses that never end
    ptx_coef: float = 0.0           # pretraining-mix loss weight (InstructGPT PPO-ptx); needs data/


CONFIG = PPOConfig


def ptx_batches(run: RunDir, rc, pc: PPOConfig, seq_len: int):
    """Pretraining batches for the PPO-ptx term, or None when it is off."""
    if pc.ptx_coef <= 0:
        return None
    from llmforge.data.shards import TokenShards
    data = TokenShards(run.data, "train")

    def get(step, micro):
        g = torch.Generator().manual_seed(rc.seed * 7 + step * 31 + micro)
        return data.sample_batch(rc.batch_size, seq_len, g)
    return get


def run(cfg: Config, run: RunDir, show_progress: bool = True, resume: bool = False, **_) -> dict:
    rc, pc = cfg.rl, cfg.ppo
    tok = load_run_tokenizer(run)
    load_run_checkpoint(run, rc.init, ("sft", "rl"), tok, f"run `llmforge sft --out {run.root}` first")
    reward_model = load_reward(run, tok, cfg.rm.safety_threshold)
    coefs = overopt.sweep_values(pc.kl_sweep) or [pc.kl_coef]
    results = []
    for coef in coefs:
        name = STAGE if len(coefs) == 1 else f"{STAGE}_kl{coef:g}"
        results.append(train_one(cfg, run, dataclasses.replace(pc, kl_coef=coef), name, reward_model,
                                 resume=resume, show_progress=show_progress))
    # the published policy: best held-out verified accuracy over every run and evaluation
    chosen = max(results, key=lambda r: r["selection_acc"])      # first wins ties: the smallest sweep index
    policy, _ = load_run_checkpoint(run, f"{chosen['name']}_best", ("rl",), tok, "")
    common.publish_policy(run, STAGE, policy, tok, {"algo": ALGO, "init": rc.init, "preset": cfg.preset,
                                                    "kl_coef": chosen["kl_coef"], "selected_from": chosen["name"],
                                                    "selection_acc": chosen["selection_acc"],
                                                    "selection_step": chosen["selection_step"]})
    points = [r for r in run.read_metrics(STAGE) if r.get("event") == "curve"]
    overopt.plot(points, run.plots / "ppo_overoptimization.png")
    summary = {**chosen["summary"], "selection_acc": chosen["selection_acc"],
               "selection_step": chosen["selection_step"], "kl_coef": chosen["kl_coef"],
               **{f"curve_{k}": v for k, v in overopt.summarize(points).items()}}
    run.log(STAGE, event="selected", **{k: v for k, v in summary.items() if isinstance(v, (int, float, bool))})
    return summary


def train_one(cfg: Config, run: RunDir, pc: PPOConfig, name: str, reward_model, *, resume: bool,
              show_progress: bool) -> dict:
    """One PPO run at pc.kl_coef, logged as stage `name`; its best checkpoint in ckpt/<name>_best."""
    rc = cfg.rl
    ctx = common.single_process()      # rollouts are generated in-process; one rank
    tok, policy, ref = common.policy_and_reference(run, rc)
    train_dir = run.ckpt(f"{name}_train")
    resume = resume and (train_dir / "train_state.json").is_file()
    best = BestCheckpoint(run, f"{name}_best", tok, resume=resume, select_p=rc.select_p)
    if resume and json.loads((train_dir / "config.json").read_text()).get("complete"):
        return {"name": name, "kl_coef": pc.kl_coef, "selection_acc": best.best, "selection_step": best.step,
                "summary": {}}      # a finished member of a sweep
    model = PolicyWithValue(policy)
    names = task_names(cfg.tasks.names)
    pool = common.prompt_pool(names, max(pc.prompts_per_rollout, 50))
    kl_ctl = AdaptiveKL(pc.kl_coef, pc.kl_target, pc.kl_horizon) if pc.kl_target > 0 else FixedKL(pc.kl_coef)
    max_len = policy.cfg.max_seq_len
    ptx = ptx_batches(run, rc, pc, min(rc.seq_len, max_len))
    amp = autocast_dtype(rc, ctx.device)

    def make_rollout(phase: int, step: int) -> RolloutBuffer:
        picked = random.Random(rc.seed * 1_000_003 + phase).sample(range(len(pool)),
                                                                   min(pc.prompts_per_rollout, len(pool)))
        samples = [row[0] for row in task_eval.sample(policy, tok, [pool[i] for i in picked], n=1,
                                                       temperature=rc.temperature, max_tokens=cfg.tasks.max_new_tokens,
                                                       seed=rc.seed + phase)]
        score = rm_scores(reward_model, samples, max_len, pc.no_end_penalty)
        buf = RolloutBuffer.from_samples(phase, samples, picked, score, tok.eot_id, max_len)
        batch = buf.batch(torch.arange(len(buf)))
        # same precision as the training forward, so the first PPO ratio is exactly 1
        with torch.no_grad(), autocast(ctx.device, amp):
            logits, values = model(batch["input_ids"])
            old_logp, entropy = gather_actions(logits, batch)
            old_values = values[torch.arange(len(buf))[:, None], batch["act_pos"]]
            ref_logp, _ = gather_actions(ref(batch["input_ids"]), batch)
        mask = batch["act_mask"]
        rewards, kl = kl_penalized_rewards(score, old_logp, ref_logp, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values * mask, mask, pc.gamma, pc.lam)
        kl_per_response = float(kl.sum(1).mean())
        run.log(name, step=step, rollout=phase, reward=float(score.mean()), kl=kl_per_response,
                kl_coef=kl_ctl.value, length=float(mask.sum(1).mean()),
                entropy=float(masked_mean(entropy, mask)), verified_reward=common.mean(s.reward for s in samples),
                ended=common.mean(float(s.ended) for s in samples))
        kl_ctl.update(kl_per_response, len(samples))
        return dataclasses.replace(buf, old_logp=old_logp, ref_logp=ref_logp, values=old_values * mask,
                                   advantages=whiten(advantages, mask), returns=returns)

    rollouts = Rollouts(run.ckpt(f"{name}_rollouts"), pc.prompts_per_rollout if len(pool) >= pc.prompts_per_rollout
                        else len(pool), rc.batch_size, rc.grad_accum, pc.ppo_epochs, rc.seed, make_rollout,
                        resume=resume, ckpt_dir=train_dir, get_state=lambda: {"kl_coef": kl_ctl.value},
                        set_state=lambda s: setattr(kl_ctl, "value", s.get("kl_coef", kl_ctl.value)))
    seen = {"step": 0}

    def get_batch(step, micro, ctx):
        seen["step"] = step + 1
        batch = rollouts(step, micro)
        if ptx is not None:
            batch["ptx_x"], batch["ptx_y"] = ptx(step, micro)
        return batch

    def loss_fn(model, batch):
        logits, values = model(batch["input_ids"])
        logp, _ = gather_actions(logits, batch)
        v = values[torch.arange(len(values))[:, None], batch["act_pos"]]
        mask = batch["act_mask"]
        pg_loss, clip_frac = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, pc.clip)
        vf_loss = ppo_value_loss(v, batch["values"], batch["returns"], mask, pc.value_clip)
        loss = pg_loss + pc.vf_coef * vf_loss
        metrics = {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "clip_frac": clip_frac.detach()}
        if "ptx_x" in batch:   # InstructGPT eq. 2, the γ·E_pretrain[log π] term
            from llmforge.model.transformer import token_cross_entropy
            ptx_logits, _ = model(batch["ptx_x"])
            ptx_loss = token_cross_entropy(ptx_logits, batch["ptx_y"])
            loss = loss + pc.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss.detach()
        return loss, metrics

    def evaluate(policy_now, step: int) -> dict:
        scored: list = []
        out = policy_eval(policy_now, ref, tok, names, rc.eval_per_task, cfg.tasks.max_new_tokens, rc.seed,
                          reward=reward_model, max_len=max_len, scored=scored, memo=run if step == 0 else None)
        run.log(STAGE, run_name=name, **overopt.point(pc.kl_coef, step, out["eval_kl"], out["eval_rm_reward"],
                                                      out["acc_mean"]))
        best.offer(policy_now, scored, step, {"algo": ALGO, "kl_coef": pc.kl_coef, "run": name})
        return out

    if not resume:   # the initial policy: the curve's origin and the first candidate
        policy.eval()
        with torch.no_grad(), autocast(ctx.device, amp):
            run.log(name, step=0, **evaluate(policy, 0))
        policy.train()
    tc = dataclasses.replace(rc, seq_len=max_len)
    if pc.curve_points > 0:
        tc = dataclasses.replace(tc, eval_every=max(1, rc.max_steps // pc.curve_points))
    ckpt = Checkpointing(train_dir, "rl_train", policy.cfg, tok, {"algo": ALGO, "kl_coef": pc.kl_coef})
    summary = train(model, tc, run, stage=name, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=lambda m: evaluate(m.policy, seen["step"]), resume=resume, show_progress=show_progress)
    rollouts.cleanup()
    return {"name": name, "kl_coef": pc.kl_coef, "selection_acc": best.best, "selection_step": best.step,
            "summary": summary}
