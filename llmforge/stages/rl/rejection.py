"""Rejection-sampling fine-tuning (Llama 2 §3.2.3): for k rounds, sample N answers per prompt
from the current policy, keep the best one (best-of-N), and fine-tune on those winners
-> ckpt/rl_rejection.

    llmforge rl --algo rejection --out runs/demo [--set rejection.group_size=8] [--set rejection.rounds=2]

Which answer is best. Where the task has a verifier (every built-in task does), the score is the
verifier's reward, with the reward models' score only as a tie-break between answers the
verifier grades equally (lexicographic: an RM score never outranks a verified difference), and a
winner the verifier marks wrong (reward < rejection.min_verified) is not trained on: fine-tuning
on a confidently wrong answer teaches the error. With rejection.use_verifier=false the score is
the reward models' alone (Llama 2's recipe, and the way to see what the RM rewards).

Each round logs the mean over prompts of the median and of the max RM score among the N samples,
the verified reward of all samples, of the winners, and of the answers the RM alone would have
picked (selection that raises RM reward but not verified reward is reward hacking), and the share
of prompts whose winner is kept.

Each round's winners are one RolloutBuffer (rollout.py) saved in ckpt/rl_rejection_rollouts, and
the fine-tuning takes shuffled minibatches of rl.batch_size × rl.grad_accum rows from it; a stage
killed mid-round resumes that round from its checkpoint and buffer.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass

import torch

from llmforge.config import Config
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.stages.rl import common
from llmforge.stages.rl.evaluate import BestCheckpoint, policy_eval
from llmforge.stages.rl.objectives import best_of_n, masked_mean
from llmforge.stages.rl.rewards import load_reward, rm_scores
from llmforge.stages.rl.rollout import RolloutBuffer, gather_actions, steps_per_rollout
from llmforge.tasks import task_names
from llmforge.train import checkpoint as ckpt_io
from llmforge.train.loop import Checkpointing, train

ALGO = "rejection"
STAGE = "rl_rejection"


@dataclass
class RejectionConfig:
    """[rejection]: rejection sampling's own knobs; batch_size, grad_accum, seed, ... are in [rl]."""
    group_size: int = 8             # N answers sampled per prompt (best-of-N)
    prompts: int = 64               # prompts per round
    rounds: int = 2                 # sample -> select -> fine-tune rounds
    steps_per_round: int = 30       # at most this many fine-tuning optimizer steps per round
    epochs: int = 2                 # passes over a round's winners (fewer steps when few are kept:
                                    # 40 steps on 25 winners memorised them, val accuracy 16% -> 7%)
    lr: float = 3e-4                # fine-tuning lr (this is SFT on the winners, so SFT-like, not rl.lr)
    no_end_penalty: float = 1.0     # subtracted from the RM score of answers that never end
    use_verifier: bool = True       # score = verifier reward, RM as tie-break; false: RM alone
    min_verified: float = 1.0       # with the verifier: winners scoring below this are not trained on
    select_best: bool = True        # publish the last round only if it beats the initial policy on held-out
                                    # validation items with p < rl.select_p (never the eval stage's test items)


CONFIG = RejectionConfig


def run(cfg: Config, run: RunDir, show_progress: bool = True, resume: bool = False, **_) -> dict:
    rc, jc = cfg.rl, cfg.rejection
    ctx = common.single_process()
    tok, policy, ref = common.policy_and_reference(run, rc)
    reward_model = load_reward(run, tok, cfg.rm.safety_threshold)
    names = task_names(cfg.tasks.names)
    pool = common.prompt_pool(names, max(jc.prompts // len(names) + 1, 50))
    N, max_len = jc.group_size, policy.cfg.max_seq_len
    train_dir, rollout_dir = run.ckpt(f"{STAGE}_train"), run.ckpt(f"{STAGE}_rollouts")
    # a time budget (rl.minutes) is shared out between the rounds' fine-tuning
    tc = dataclasses.replace(rc, lr=jc.lr, max_steps=jc.steps_per_round, seq_len=max_len, eval_every=0,
                             minutes=rc.minutes / jc.rounds if rc.minutes > 0 else 0.0)

    first, resume_round = 0, False
    if resume and (train_dir / "train_state.json").is_file():
        meta = json.loads((train_dir / "config.json").read_text())
        if meta.get("complete"):      # killed between rounds: continue from the finished round's weights
            ckpt_io.load_into(policy, ckpt_io.load_weights(train_dir), train_dir)
            first = meta["round"] + 1
        else:                         # killed inside a round: the loop resumes it
            first, resume_round = meta["round"], True
    elif rollout_dir.exists():
        shutil.rmtree(rollout_dir)    # a fresh start never reads another run's rollouts

    def make_round(round_: int) -> RolloutBuffer:
        picked = random.Random(rc.seed * 1_000_003 + round_).sample(range(len(pool)), min(jc.prompts, len(pool)))
        groups = task_eval.sample(policy, tok, [pool[i] for i in picked], n=N, temperature=rc.temperature,
                                  max_tokens=cfg.tasks.max_new_tokens, seed=rc.seed + 1000 * round_)
        flat = [s for row in groups for s in row]
        rm = rm_scores(reward_model, flat, max_len, jc.no_end_penalty).view(len(groups), N)
        verified = torch.tensor([[s.reward for s in row] for row in groups])
        by_rm = best_of_n(rm)
        pick = best_of_n(verified, tie_break=rm) if jc.use_verifier else by_rm
        best = [groups[i][j] for i, j in enumerate(pick.tolist())]
        keep = [k for k, s in enumerate(best) if not jc.use_verifier or s.reward >= jc.min_verified]
        run.log(STAGE, round=round_, reward_median=float(rm.median(1).values.mean()),
                reward_max=float(rm.max(1).values.mean()), reward=float(rm.mean()),
                verified_all=float(verified.mean()), verified_best=common.mean(s.reward for s in best),
                verified_best_by_rm=float(verified.gather(1, by_rm[:, None]).mean()),
                kept=len(keep) / max(len(best), 1))
        if not keep:
            return None
        return RolloutBuffer.from_samples(round_, [best[k] for k in keep], [picked[k] for k in keep],
                                          torch.tensor([best[k].reward for k in keep]), tok.eot_id, max_len)

    def loss_fn(model, batch):
        # SFT on the winners: next-token loss on the tokens the model sampled itself
        logp, _ = gather_actions(model(batch["input_ids"]), batch)
        return -masked_mean(logp, batch["act_mask"]), {}

    scored: list = []     # the last evaluation's (task, 0/1) per validation item

    def eval_fn(model, initial: bool = False):
        return policy_eval(model, ref, tok, names, rc.eval_per_task, cfg.tasks.max_new_tokens, rc.seed, scored=scored,
                           memo=run if initial else None)

    best = BestCheckpoint(run, f"{STAGE}_best", tok, resume=resume, select_p=rc.select_p)
    if jc.select_best and first == 0 and not resume_round:   # the policy to beat: the one we start from
        policy.eval()
        start = eval_fn(policy, initial=True)
        policy.train()
        run.log(STAGE, step=0, **start)
        best.offer(policy, scored, 0, {"algo": ALGO})   # "step" here: rounds done

    summary: dict = {}
    for round_ in range(first, jc.rounds):
        path = rollout_dir / f"rollout_{round_}.safetensors"
        if resume_round and path.is_file():
            buf = RolloutBuffer.load(path)
        else:
            buf = make_round(round_)
            if buf is not None:
                buf.save(path)
        last = round_ == jc.rounds - 1
        if buf is None:               # no answer the verifier accepts: nothing to imitate this round
            resume_round = False
            if last:
                summary = eval_fn(policy)
                run.log(STAGE, event="done", **summary)
            continue

        def get_batch(step, micro, ctx, buf=buf):
            return buf.batch(buf.step_rows(step, rc.batch_size, rc.grad_accum, rc.seed)[micro])

        ckpt = Checkpointing(train_dir, "rl_train", policy.cfg, tok, {"algo": ALGO, "round": round_})
        steps = min(jc.steps_per_round, steps_per_rollout(len(buf), rc.batch_size, rc.grad_accum, jc.epochs))
        summary = train(policy, dataclasses.replace(tc, max_steps=steps), run, stage=STAGE, ctx=ctx,
                        get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                        eval_fn=eval_fn if last else None, resume=resume_round, show_progress=show_progress)
        resume_round = False
    shutil.rmtree(rollout_dir, ignore_errors=True)
    meta = {"algo": ALGO, "init": rc.init, "preset": cfg.preset, "use_verifier": jc.use_verifier}
    if jc.select_best and best.step >= 0:
        if not (scored and best.offer(policy, scored, jc.rounds, {"algo": ALGO})):
            best.load_into(policy)    # the last round did not beat the initial policy: publish that
        meta.update(selection_acc=best.best, selection_after_rounds=best.step)
        summary = {**summary, "selection_acc": best.best, "selection_after_rounds": best.step}
    common.publish_policy(run, STAGE, policy, tok, meta)
    return summary
