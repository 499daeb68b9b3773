"""DPO: direct preference optimization on the preference pairs, against a frozen reference
(Rafailov et al. 2023) -> ckpt/rl_dpo. No reward model, no sampling during training.

    llmforge rl --algo dpo --out runs/demo [--set dpo.beta=0.1]

Pairs come from prefs/train.jsonl (written by `llmforge rm`, or by the user in that format).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.run import RunDir
from llmforge.stages import prefs
from llmforge.stages.common import lm_batch
from llmforge.stages.rl import common
from llmforge.stages.rl.evaluate import policy_eval
from llmforge.stages.rl.objectives import chosen_nll, dpo_loss
from llmforge.tasks import task_names
from llmforge.tokenizer.chat import render
from llmforge.train.loop import Checkpointing, train

ALGO = "dpo"
STAGE = "rl_dpo"


@dataclass
class DPOConfig:
    """[dpo]: DPO's own knobs; the loop's (lr, batch_size, grad_accum, max_steps, ...) are in [rl]."""
    beta: float = 0.1               # β: strength of the implicit KL to the reference (DPO eq. 7)
    nll_coef: float = 0.0           # α of RPO's NLL term on the chosen answers (0 = plain DPO; see chosen_nll)


CONFIG = DPOConfig


def run(cfg: Config, run: RunDir, show_progress: bool = True, resume: bool = False, **_) -> dict:
    """No rollouts: a batch is a pure function of the step, so the loop's resume is exact."""
    rc, dc = cfg.rl, cfg.dpo
    ctx = common.single_process()
    tok, policy, ref = common.policy_and_reference(run, rc)
    path = run.prefs / "train.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; run `llmforge rm --out {run.root}` first (it writes the pairs)")
    max_len = policy.cfg.max_seq_len
    pairs = [(render(tok, p["prompt"] + p["chosen"]), render(tok, p["prompt"] + p["rejected"]))
             for p in prefs.load_pairs(path)]
    pairs = [(c, r) for c, r in pairs if len(c[0]) <= max_len + 1 and len(r[0]) <= max_len + 1]
    if not pairs:
        raise UserError(f"no preference pair in {path} fits the context of {max_len} tokens")
    B = rc.batch_size

    def batch_of(pick):
        return lm_batch([pairs[i][0] for i in pick] + [pairs[i][1] for i in pick], max_len, tok.eot_id)

    # the reference log-probabilities never change: compute them once
    with torch.no_grad():
        ref_logp = torch.cat([common.sequence_logprob(ref, batch_of(range(i, min(i + 64, len(pairs)))))
                              .view(2, -1).T for i in range(0, len(pairs), 64)])   # (n_pairs, 2)
    names = task_names(cfg.tasks.names)

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(rc.seed * 1_000_003 + step * 1_009 + micro)
        pick = torch.randint(0, len(pairs), (B,), generator=g)
        return {**batch_of(pick.tolist()), "ref_logp": ref_logp[pick]}

    def loss_fn(model, batch):
        chosen, rejected = common.sequence_logprob(model, batch).chunk(2)
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, batch["ref_logp"][:, 0], batch["ref_logp"][:, 1],
                                              dc.beta)
        nll = chosen_nll(chosen, batch["loss_mask"].chunk(2)[0].sum(1))
        return loss + dc.nll_coef * nll, {"dpo_loss": loss.detach(), "chosen_nll": nll.detach(),
                                          "reward_acc": (r_chosen > r_rejected).float().mean(),
                                          "reward_margin": (r_chosen - r_rejected).mean().detach()}

    def eval_fn(model):
        return policy_eval(model, ref, tok, names, rc.eval_per_task, cfg.tasks.max_new_tokens, rc.seed)

    tc = dataclasses.replace(rc, seq_len=max_len)
    train_dir = run.ckpt(f"{STAGE}_train")
    ckpt = Checkpointing(train_dir, "rl_train", policy.cfg, tok, {"algo": ALGO})
    summary = train(policy, tc, run, stage=STAGE, ctx=ctx, get_batch=get_batch, loss_fn=loss_fn, ckpt=ckpt,
                    eval_fn=eval_fn, resume=resume and (train_dir / "train_state.json").is_file(),
                    show_progress=show_progress)
    common.publish_policy(run, STAGE, policy, tok, {"algo": ALGO, "init": rc.init, "preset": cfg.preset})
    return summary
