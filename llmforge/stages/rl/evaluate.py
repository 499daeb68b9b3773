"""How an RL stage watches its policy: held-out verified accuracy, KL to the reference per
response, and (for PPO) what the reward models think; and the choice of checkpoint by held-out
verified accuracy, never by the reward the policy was trained on.
"""
from __future__ import annotations

import json

import torch

from llmforge.run import RunDir
from llmforge.stages.rl.common import mean
from llmforge.stages.rl.rollout import gather_actions, rollout_batch
from llmforge.train import checkpoint as ckpt_io


def selection_items(names: list[str], per_task: int):
    """Prompts that choose between checkpoints: each task's validation items (evaluation-side
    phrasings and content, but never the eval stage's test prompts)."""
    from llmforge.tasks import get_task
    return [item for n in names for item in get_task(n).validation_items(per_task)]


@torch.no_grad()
def policy_eval(policy, ref, tok, names: list[str], per_task: int, max_tokens: int, seed: int = 0,
                reward=None, max_len: int | None = None) -> dict:
    """Verified accuracy of greedy answers to selection_items, plus, on temperature-1 samples of
    half of them: KL to the reference per response (Σ_t log π - log π_ref, nats), response
    length, entropy, verified reward and, when `reward` (rewards.CombinedReward) is given, the
    reward models' mean score (eval_rm_reward) — the two axes of the over-optimisation curve."""
    from llmforge.eval import tasks as task_eval
    items = selection_items(names, per_task)
    greedy = [row[0] for row in task_eval.sample(policy, tok, items, n=1, temperature=0.0,
                                                 max_tokens=max_tokens, seed=seed)]
    acc = {n: mean(float(s.reward >= 1.0) for s in greedy if s.item.task == n) for n in names}
    half = [it for n in names for it in [i for i in items if i.task == n][:max(1, per_task // 2)]]
    samples = [row[0] for row in task_eval.sample(policy, tok, half, n=1, temperature=1.0,
                                                  max_tokens=max_tokens, seed=seed + 7)]
    stats = sample_stats(policy, ref, samples, tok.eot_id)
    out = {"acc_mean": mean(acc.values()), **{f"acc_{n}": a for n, a in acc.items()},
           "eval_kl": stats["kl"], "eval_length": stats["length"], "eval_entropy": stats["entropy"],
           "eval_sample_reward": mean(s.reward for s in samples)}
    if reward is not None:
        from llmforge.stages.rl.rewards import rm_scores
        out["eval_rm_reward"] = float(rm_scores(reward, samples, max_len or policy.cfg.max_seq_len).mean())
    return out


@torch.no_grad()
def sample_stats(policy, ref, samples, pad_id: int) -> dict:
    batch = rollout_batch(samples, pad_id, policy.cfg.max_seq_len)
    logp, entropy = gather_actions(policy(batch["input_ids"]), batch)
    ref_logp, _ = gather_actions(ref(batch["input_ids"]), batch)
    m = batch["act_mask"]
    return {"kl": float(((logp - ref_logp) * m).sum(1).mean()), "length": float(m.sum(1).mean()),
            "entropy": float((entropy * m).sum() / m.sum().clamp(min=1))}


class BestCheckpoint:
    """Keeps, in ckpt/<folder>, the policy with the highest held-out verified accuracy seen so far
    (ties keep the earlier one, so a stage that never beats its initial policy publishes it).
    It survives a resume: the accuracy to beat is read back from the folder's config."""

    def __init__(self, run: RunDir, folder: str, tok, resume: bool = False):
        self.path, self.tok = run.ckpt(folder), tok
        config = self.path / "config.json"
        self.best = -1.0
        self.step = -1
        if resume and config.is_file():
            meta = json.loads(config.read_text())
            self.best, self.step = meta.get("selection_acc", -1.0), meta.get("selection_step", -1)

    def offer(self, policy, acc: float, step: int, meta: dict | None = None) -> bool:
        if acc <= self.best:
            return False
        self.best, self.step = acc, step
        ckpt_io.save_checkpoint(self.path, policy, kind="rl", model_cfg=policy.cfg, tokenizer=self.tok,
                                meta={**(meta or {}), "selection_acc": acc, "selection_step": step})
        return True

    def load_into(self, policy) -> None:
        ckpt_io.load_into(policy, ckpt_io.load_weights(self.path), self.path)
