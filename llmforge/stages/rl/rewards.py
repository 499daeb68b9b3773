"""Rewards an RL stage optimises: the reward models' scores (Llama 2's combination of a
helpfulness and a safety RM) and, where a task has one, the verifier's reward."""
from __future__ import annotations

import torch

from llmforge.run import RunDir
from llmforge.stages.common import pad
from llmforge.stages.rl.common import frozen
from llmforge.train.checkpoint import load_run_checkpoint


@torch.no_grad()
def score_sequences(rm, seqs: list[list[int]], pad_id: int, batch: int = 32) -> torch.Tensor:
    """Raw reward-model scores (at each sequence's last token), in the order of `seqs`. Batches
    are formed from length-sorted sequences, so little of each forward pass is padding."""
    max_len = rm.trunk.cfg.max_seq_len
    seqs = [s[-max_len:] for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        chunk = [seqs[j] for j in idx]
        out[idx] = rm.score_last(pad(chunk, pad_id), torch.tensor([len(s) for s in chunk])).float()
    return out


class CombinedReward:
    """Llama 2's combination of a helpfulness and a safety reward model (Touvron et al. 2023, eq. 4):
    R = R_safety if the prompt is safety-relevant or σ(R_safety) < threshold, else R_helpful.
    Each model's scores are first normalized to mean 0 / std 1 on its reference set."""

    def __init__(self, helpful, helpful_cfg: dict, safety=None, safety_cfg: dict | None = None,
                 threshold: float = 0.15, pad_id: int = 0):
        self.helpful, self.safety, self.threshold, self.pad_id = helpful, safety, threshold, pad_id
        self.h_norm = (helpful_cfg.get("reward_mean", 0.0), helpful_cfg.get("reward_std", 1.0))
        self.s_norm = ((safety_cfg or {}).get("reward_mean", 0.0), (safety_cfg or {}).get("reward_std", 1.0))

    def __call__(self, seqs: list[list[int]], safety_relevant: list[bool]) -> torch.Tensor:
        h = (score_sequences(self.helpful, seqs, self.pad_id) - self.h_norm[0]) / self.h_norm[1]
        if self.safety is None:
            return h
        s = (score_sequences(self.safety, seqs, self.pad_id) - self.s_norm[0]) / self.s_norm[1]
        use_safety = torch.tensor(safety_relevant) | (torch.sigmoid(s) < self.threshold)
        return torch.where(use_safety, s, h)


def load_reward(run: RunDir, tok, threshold: float) -> CombinedReward:
    helpful, h_cfg = load_run_checkpoint(run, "rm", ("rm",), tok, f"run `llmforge rm --out {run.root}` first")
    safety, s_cfg = None, None
    if (run.ckpt("rm_safety") / "config.json").is_file():
        safety, s_cfg = load_run_checkpoint(run, "rm_safety", ("rm_safety",), tok, "")
        safety = frozen(safety)
    return CombinedReward(frozen(helpful), h_cfg, safety, s_cfg, threshold, pad_id=tok.eot_id)


def rm_scores(reward_model: CombinedReward, samples, max_len: int, no_end_penalty: float = 0.0) -> torch.Tensor:
    """The reward models' score of each graded sample (eval.tasks.Sample), minus a penalty for
    responses that never ended (they ran out of tokens: nothing a user could read)."""
    seqs = [(s.prompt_ids + s.completion.tokens)[:max_len] for s in samples]
    score = reward_model(seqs, [s.item.safety_relevant for s in samples])
    return score - no_end_penalty * torch.tensor([not s.ended for s in samples]).float()
