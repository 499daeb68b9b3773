"""Rejection-sampling fine-tuning (Llama 2 §3.2.3): for k rounds, sample N answers per prompt
from the current policy, keep the one the reward model scores highest (best-of-N), and
fine-tune on those winners -> ckpt/rl_rejection.

    llmforge rl --algo rejection --out runs/demo [--set rl.group_size=8] [--set rl.rounds=2]

Knobs: rl.rejection_prompts prompts per round, rl.group_size = N, rl.steps_per_round steps at
rl.rejection_lr (this is supervised fine-tuning, so its lr is SFT-like, unlike PPO's rl.lr).

Each round logs the mean over prompts of the median and of the max reward among the N
samples (their gap is what best-of-N buys), and the verified reward of all samples vs. of the
selected ones (selection that raises RM reward but not verified reward is reward hacking).
"""
from __future__ import annotations

import dataclasses
import random

import torch

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl import common
from llmforge.stages.rl.objectives import best_of_n
from llmforge.tasks import task_names
from llmforge.train.loop import Checkpointing, train

ALGO = "rejection"
STAGE = "rl_rejection"


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    rc = cfg.rl
    ctx = common.single_process()
    tok, policy, ref = common.policy_and_reference(run, rc)
    reward_model = common.load_reward(run, tok, cfg.rm.safety_threshold)
    names = task_names(cfg.sft.tasks)
    pool = common.prompt_pool(names, max(rc.rejection_prompts // len(names) + 1, 50))
    rng = random.Random(rc.seed)
    N, max_len = rc.group_size, policy.cfg.max_seq_len
    # a time budget (rl.minutes) is shared out between the rounds' fine-tuning
    tc = dataclasses.replace(rc, lr=rc.rejection_lr, max_steps=rc.steps_per_round, seq_len=max_len, eval_every=0,
                             minutes=rc.minutes / rc.rounds if rc.minutes > 0 else 0.0)
    summary: dict = {}
    for round_ in range(rc.rounds):
        items = rng.sample(pool, min(rc.rejection_prompts, len(pool)))
        groups = task_eval.sample(policy, tok, items, n=N, temperature=rc.temperature,
                                  max_tokens=rc.max_new_tokens, seed=rc.seed + 1000 * round_)
        flat = [s for row in groups for s in row]
        seqs = [(s.prompt_ids + s.completion.tokens)[:max_len] for s in flat]
        scores = reward_model(seqs, [s.item.safety_relevant for s in flat])
        scores = scores - rc.no_end_penalty * torch.tensor([not s.ended for s in flat]).float()
        scores = scores.view(len(groups), N)
        best = [groups[i][j] for i, j in enumerate(best_of_n(scores).tolist())]
        run.log(STAGE, round=round_, reward_median=float(scores.median(1).values.mean()),
                reward_max=float(scores.max(1).values.mean()), reward=float(scores.mean()),
                verified_all=common.mean(s.reward for s in flat), verified_best=common.mean(s.reward for s in best))
        # fine-tune on the winners: next-token loss on the tokens the model sampled itself
        data = []
        for s in best:
            ids = s.prompt_ids + s.completion.tokens
            mask = [0] * len(s.prompt_ids) + [int(g) for g in s.completion.generated]
            data.append((ids[:max_len], mask[:max_len]))
        B = rc.batch_size

        def get_batch(step, micro, ctx, data=data, round_=round_):
            g = torch.Generator().manual_seed(rc.seed * 1_000_003 + round_ * 7919 + step * 1_009 + micro)
            pick = torch.randint(0, len(data), (B,), generator=g).tolist()
            return common.lm_batch([data[i] for i in pick], max_len, tok.eot_id)

        def loss_fn(model, batch):
            _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"])
            return loss, {}

        last = round_ == rc.rounds - 1

        def eval_fn(model):
            return common.policy_eval(model, ref, tok, names, rc.eval_per_task, rc.max_new_tokens, rc.seed)

        ckpt = Checkpointing(run.ckpt(f"{STAGE}_train"), "rl_train", policy.cfg, tok, {"algo": ALGO, "round": round_})
        summary = train(policy, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                        eval_fn=eval_fn if last else None, show_progress=show_progress)
    common.publish_policy(run, STAGE, policy, tok, {"algo": ALGO, "init": rc.init, "preset": cfg.preset})
    return summary
