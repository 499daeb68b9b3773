"""The math of preference learning and RLHF, written out plainly on tensors.

Shapes: B sequences, T response tokens; `mask` is 1 on real response tokens and 0 on padding
(response tokens are left-aligned: token t of the response is column t). Every function is
pure: tensors in, tensors out, so tests can check each against hand-computed values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ---------------------------------------------------------------- reward models

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None):
    # Llama 2 eq. (2): L = -log σ(r(x, y_c) - r(x, y_r) - m(r)), m = 0 without the margin term
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


# ---------------------------------------------------------------- PPO (Schulman et al. 2017; Ouyang et al. 2022)

def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float):
    """Per-token rewards: -β·(log π - log π_ref) on every token, plus the sequence score on the
    last real token (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2). Returns (rewards, kl)."""
    # per-token KL estimate log π(y_t) - log π_ref(y_t) (the "k1" estimator of KL(π || π_ref))
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score)), last] += score
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    # Schulman et al. 2016 (GAE) eq. 16: A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} - V_t
    # computed backwards; the value after a sequence's last real token is 0 (episode ends).
    rewards, values, mask = rewards * mask, values * mask, mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask[:, t + 1] if t + 1 < T else 0.0)
        advantages[:, t] = running * mask[:, t]
    returns = advantages + values
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    # advantage normalization (PPO implementation detail, Huang et al. 2022 "37 details", #7):
    # zero mean, unit variance over the real tokens of the batch
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2):
    # PPO clipped surrogate (Schulman et al. 2017 eq. 7): L = -E[min(ρA, clip(ρ, 1-ε, 1+ε)A)], ρ = π/π_old
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float = 0.2):
    # clipped value loss (Schulman et al. 2017 baselines; "37 details" #9):
    # ½·max((V - R)², (V_old + clip(V - V_old, -ε, ε) - R)²)
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return masked_mean(loss, mask)


class FixedKL:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    # Ziegler et al. 2019, §2.2: e = clip(KL/KL_target - 1, -0.2, 0.2); β ← β·(1 + K_β·e), K_β = n_steps/horizon
    def __init__(self, kl_coef: float, target: float, horizon: int = 10000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------- DPO (Rafailov et al. 2023)

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1):
    """Inputs are summed log-probabilities of each response. Returns (loss, chosen_reward,
    rejected_reward); the implicit rewards are β·log(π/π_ref)."""
    # DPO eq. 7: L = -log σ(β log(π(y_w)/π_ref(y_w)) - β log(π(y_l)/π_ref(y_l)))
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen responses: the term RPO adds to DPO
    (Pang et al. 2024, eq. 3: L = L_DPO + α · -log π(y_w|x) / |y_w|). DPO alone only widens the
    margin, and may do so by lowering the chosen answer's probability as well as the rejected
    one's; the NLL term keeps the chosen answer likely."""
    return (-policy_chosen / chosen_tokens.clamp(min=1)).mean()


# ---------------------------------------------------------------- GRPO (Shao et al. 2024, DeepSeekMath)

def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards: (n_groups, G) -> advantages of the same shape."""
    # DeepSeekMath §4.1.2 outcome supervision: Â_i = (r_i - mean(r)) / std(r) within a group
    # (population std; a group whose rewards are all equal gets advantage 0, i.e. no signal)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


# ---------------------------------------------------------------- rejection sampling (Llama 2 §3.2.3)

def best_of_n(scores: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """scores: (n_prompts, N) reward of each sample -> index of the best sample per prompt.
    With tie_break (same shape), the order is lexicographic: the highest score first, and among
    samples with that score the highest tie_break (the reward model behind a verifier). Remaining
    ties go to the earliest sample, so selection is deterministic."""
    if tie_break is None:
        return torch.argmax(scores, dim=1)
    top = scores == scores.max(dim=1, keepdim=True).values
    return torch.argmax(torch.where(top, tie_break.float(), torch.tensor(float("-inf"))), dim=1)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards: (n_groups, G) -> bool (n_groups,): groups whose rewards are not all equal. A group
    of equal rewards has zero group-relative advantage, so it carries no policy gradient; DAPO's
    dynamic sampling (Yu et al. 2025, eq. 11: 0 < |{correct}| < G) discards it and samples more."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


# ---------------------------------------------------------------- the KL-regularized optimum


def kl_regularized_optimum(ref_logp: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Log-probabilities of the policy that maximizes E_π[r] - β·KL(π || π_ref) over a finite set
    of responses (Rafailov et al. 2023 eq. 4; Korbak et al. 2022): π*(y) ∝ π_ref(y)·exp(r(y)/β)."""
    return torch.log_softmax(ref_logp + reward / beta, dim=-1)


def kl_categorical(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(π || π_ref) = Σ_y π(y)·(log π(y) - log π_ref(y)) of categorical distributions (nats)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's next-token distribution; logits (..., V)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
