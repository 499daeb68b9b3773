"""What the alignment stages share: loading checkpoints of the right kind, turning
conversations and rollouts into padded tensors, per-token log-probabilities, and the
combined reward of the two reward models.
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F

from llmforge.errors import UserError
from llmforge.run import RunDir
from llmforge.train import checkpoint as ckpt_io
from llmforge.train.distributed import DistContext

# ---------------------------------------------------------------- checkpoints


def load_tokenizer(run: RunDir):
    from llmforge.tokenizer.bpe import Tokenizer
    if not run.tokenizer.is_file():
        raise UserError(f"{run.tokenizer} is missing; run `llmforge data prepare --out {run.root}` first")
    return Tokenizer.load(run.tokenizer)


def load_checkpoint(run: RunDir, folder: str, kinds, tok, hint: str):
    """(model, config) of ckpt/<folder>, checking its kind and that its tokenizer is the run's."""
    path = run.ckpt(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is missing; {hint}")
    model, config, _ = ckpt_io.load_model(path, kinds=kinds)
    if config.get("tokenizer_hash") not in (None, tok.hash):
        raise UserError(f"{path} was trained with a different tokenizer than {run.tokenizer}; "
                        "use the tokenizer of the run that produced the checkpoint")
    return model, config


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy (reference policy, reward models)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- tensors


def pad(rows: list[list[int]], value: int = 0, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def lm_batch(seqs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """(ids, mask) sequences -> next-token batch {input_ids, targets, loss_mask} of width seq_len."""
    ids = [s[:seq_len + 1] for s, _ in seqs]
    masks = [m[:seq_len + 1] for _, m in seqs]
    width = min(seq_len, max(len(s) for s in ids) - 1)
    x = pad([s[:-1] for s in ids], pad_id, width)
    y = pad([s[1:] for s in ids], pad_id, width)
    m = pad([mk[1:] for mk in masks], 0, width).float()
    return {"input_ids": x, "targets": y, "loss_mask": m}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for every position; logits (B, T, V), targets (B, T)."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def sequence_logprob(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of the masked (assistant) tokens of each row."""
    logits = model(batch["input_ids"])
    return (token_logprobs(logits, batch["targets"]) * batch["loss_mask"]).sum(1)


# ---------------------------------------------------------------- rewards


@torch.no_grad()
def score_sequences(rm, seqs: list[list[int]], pad_id: int, batch: int = 32) -> torch.Tensor:
    """Raw reward-model scores (at each sequence's last token)."""
    out = []
    max_len = rm.trunk.cfg.max_seq_len
    for i in range(0, len(seqs), batch):
        chunk = [s[-max_len:] for s in seqs[i:i + batch]]
        lengths = torch.tensor([len(s) for s in chunk])
        out.append(rm.score_last(pad(chunk, pad_id), lengths).float())
    return torch.cat(out) if out else torch.zeros(0)


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
    helpful, h_cfg = load_checkpoint(run, "rm", ("rm",), tok, f"run `llmforge rm --out {run.root}` first")
    safety, s_cfg = None, None
    if (run.ckpt("rm_safety") / "config.json").is_file():
        safety, s_cfg = load_checkpoint(run, "rm_safety", ("rm_safety",), tok, "")
        safety = frozen(safety)
    return CombinedReward(frozen(helpful), h_cfg, safety, s_cfg, threshold, pad_id=tok.eot_id)


# ---------------------------------------------------------------- misc


def policy_and_reference(run: RunDir, rc):
    """(tokenizer, policy to train, frozen copy as the KL reference) for an RL stage; the
    policy starts from ckpt/<rl.init> and trains only its top rl.train_layers when set."""
    tok = load_tokenizer(run)
    policy, _ = load_checkpoint(run, rc.init, ("sft", "rl"), tok, f"run `llmforge sft --out {run.root}` first")
    ref = frozen(policy)
    trainable_top_layers(policy, rc.train_layers)
    return tok, policy, ref


def publish_policy(run: RunDir, stage: str, model, tok, meta: dict) -> None:
    """Write the trained policy as an ordinary "rl" checkpoint (a plain Transformer) in
    ckpt/<stage>, kept for the arena, and in ckpt/rl, the run's latest RL policy."""
    for folder in (stage, "rl"):
        ckpt_io.save_checkpoint(run.ckpt(folder), model, kind="rl", model_cfg=model.cfg, tokenizer=tok, meta=meta)


def single_process() -> DistContext:
    from llmforge.train.distributed import pick_device
    return DistContext(device=pick_device())


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


# ---------------------------------------------------------------- rollouts as tensors


def rollout_batch(samples, pad_id: int, max_len: int) -> dict:
    """Graded samples (eval.tasks.Sample) -> tensors over *action* tokens.

    A sample's full sequence is prompt + everything after it, including tool results the engine
    inserted. Only tokens the model sampled are actions: action t of row b is token
    input_ids[b, act_pos[b, t] + 1], predicted by the logits at act_pos[b, t]. Actions are
    left-aligned (act_mask is 1 on a contiguous prefix), so GAE/whitening see one clean
    sequence per row and inserted tool results simply become part of the environment."""
    seqs, positions, tokens = [], [], []
    for s in samples:
        seq = (s.prompt_ids + s.completion.tokens)[:max_len]
        pos = [len(s.prompt_ids) + j - 1 for j, gen in enumerate(s.completion.generated)
               if gen and len(s.prompt_ids) + j < len(seq)]
        seqs.append(seq)
        positions.append(pos)
        tokens.append([seq[p + 1] for p in pos])
    A = max(1, max(len(p) for p in positions))
    act_mask = torch.zeros(len(samples), A)
    for i, p in enumerate(positions):
        act_mask[i, :len(p)] = 1.0
    return {"input_ids": pad(seqs, pad_id), "act_pos": pad(positions, 0, A), "act_tok": pad(tokens, 0, A),
            "act_mask": act_mask, "lengths": torch.tensor([len(s) for s in seqs])}


def gather_actions(logits: torch.Tensor, batch: dict):
    """(log π(action), entropy) at each action position; logits (B, L, V) -> (B, A) each."""
    rows = torch.arange(logits.shape[0])[:, None]
    at = logits[rows, batch["act_pos"]].float()                      # (B, A, V)
    logp_all = F.log_softmax(at, dim=-1)
    logp = logp_all.gather(-1, batch["act_tok"][..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trainable_top_layers(model, k: int) -> None:
    """Freeze everything but the top k transformer layers and the final norm (InstructGPT-style
    partial fine-tuning). With tied embeddings the output head is the embedding and stays frozen."""
    if k <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers[-k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in model.norm.parameters():
        p.requires_grad_(True)
    if not model.cfg.tie_embeddings:
        model.lm_head.weight.requires_grad_(True)


def prompt_pool(names: list[str], per_task: int, offset: int = 700_000):
    from llmforge.tasks import get_task
    return [item for n in names for item in get_task(n).train_items(per_task, offset=offset)]


@torch.no_grad()
def policy_eval(policy, ref, tok, names: list[str], per_task: int, max_tokens: int, seed: int = 0) -> dict:
    """Held-out verified accuracy (greedy) plus, on temperature-1 samples of the same prompts,
    the KL to the reference per response (Σ_t log π - log π_ref), response length and entropy."""
    from llmforge.eval import tasks as task_eval
    acc = task_eval.evaluate(policy, tok, names, per_task, max_tokens=max_tokens, seed=seed)
    items = task_eval.heldout(names, max(1, per_task // 2))
    samples = [row[0] for row in task_eval.sample(policy, tok, items, n=1, temperature=1.0,
                                                  max_tokens=max_tokens, seed=seed + 7)]
    stats = sample_stats(policy, ref, samples, tok.eot_id)
    return {"acc_mean": acc["mean"]["accuracy"], **{f"acc_{n}": acc[n]["accuracy"] for n in names},
            "eval_kl": stats["kl"], "eval_length": stats["length"], "eval_entropy": stats["entropy"],
            "eval_sample_reward": mean(s.reward for s in samples)}


@torch.no_grad()
def sample_stats(policy, ref, samples, pad_id: int) -> dict:
    batch = rollout_batch(samples, pad_id, policy.cfg.max_seq_len)
    logp, entropy = gather_actions(policy(batch["input_ids"]), batch)
    ref_logp, _ = gather_actions(ref(batch["input_ids"]), batch)
    m = batch["act_mask"]
    return {"kl": float(((logp - ref_logp) * m).sum(1).mean()), "length": float(m.sum(1).mean()),
            "entropy": float((entropy * m).sum() / m.sum().clamp(min=1))}
