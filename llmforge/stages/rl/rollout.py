"""Rollouts: what one round of sampling produced, as one named buffer of tensors, and the
schedule that turns it into the optimizer steps of the one training loop.

An on-policy RL stage alternates two phases. Rollout p is sampled by the policy as it stands at
optimizer step p·S; the next S optimizer steps consume it, `epochs` passes over the buffer, each
a fresh seeded shuffle cut into steps of rl.batch_size × rl.grad_accum rows (grad_accum
micro-batches of batch_size rows). S is fixed by the configuration, so step -> (rollout, minibatch)
is a pure function and the loop's resume is exact:

    S = epochs · ceil(N / (micro · grad_accum)),   micro = min(batch_size, ceil(N / grad_accum))

Each buffer is written to ckpt/<stage>_rollouts/rollout_<p>.safetensors (tensors + the stage's
JSON state in the metadata) when it is made. A stage killed mid-rollout resumes from its last
training checkpoint, reloads rollout p instead of sampling it again from weights that have
moved on, and finishes with the same weights as a run that was never interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llmforge.stages.common import pad

# ---------------------------------------------------------------- samples -> action tensors


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
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    at = logits[rows, batch["act_pos"]].float()                      # (B, A, V)
    logp_all = F.log_softmax(at, dim=-1)
    logp = logp_all.gather(-1, batch["act_tok"][..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------- the buffer


@dataclass
class RolloutBuffer:
    """One rollout: N responses with everything the update needs, row-aligned.
    Per-action tensors are (N, A), left-aligned and zero where act_mask is 0."""
    phase: int                       # which rollout of the stage this is (0, 1, ...)
    input_ids: torch.Tensor          # (N, L) prompt + response (+ inserted tool results), right-padded
    lengths: torch.Tensor            # (N,) real tokens per row
    act_pos: torch.Tensor            # (N, A) position whose logits predict action t
    act_tok: torch.Tensor            # (N, A) the sampled token of action t
    act_mask: torch.Tensor           # (N, A) 1 on real actions
    rewards: torch.Tensor            # (N,) the score each response was given (RM, verifier, ...)
    item_ids: torch.Tensor           # (N,) index of the prompt in the stage's prompt pool
    old_logp: torch.Tensor | None = None    # (N, A) log π_old(action) at sampling time
    ref_logp: torch.Tensor | None = None    # (N, A) log π_ref(action)
    advantages: torch.Tensor | None = None  # (N, A)
    values: torch.Tensor | None = None      # (N, A) PPO: V_old at each action
    returns: torch.Tensor | None = None     # (N, A) PPO: GAE returns, the value target
    meta: dict = field(default_factory=dict)  # JSON state of the stage after this rollout (e.g. KL coef)

    TENSORS = ("input_ids", "lengths", "act_pos", "act_tok", "act_mask", "rewards", "item_ids",
               "old_logp", "ref_logp", "advantages", "values", "returns")

    @classmethod
    def from_samples(cls, phase: int, samples, item_ids, rewards, pad_id: int, max_len: int, **tensors):
        b = rollout_batch(samples, pad_id, max_len)
        return cls(phase=phase, input_ids=b["input_ids"], lengths=b["lengths"], act_pos=b["act_pos"],
                   act_tok=b["act_tok"], act_mask=b["act_mask"], rewards=torch.as_tensor(rewards).float(),
                   item_ids=torch.as_tensor(item_ids).long(), **tensors)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: torch.Tensor) -> dict:
        """The rows as a batch dict, trimmed to the longest sequence / action run among them."""
        width = int(self.lengths[rows].max())
        acts = max(1, int(self.act_mask[rows].sum(1).max()))
        out = {}
        for name in self.TENSORS:
            t = getattr(self, name)
            if t is None:
                continue
            t = t[rows]
            if name == "input_ids":
                t = t[:, :width]
            elif t.dim() == 2:
                t = t[:, :acts]
            out[name] = t
        return out

    # ------------------------------------------------------------ minibatches

    def step_rows(self, k: int, batch_size: int, grad_accum: int, seed: int) -> list[torch.Tensor]:
        """Row indices of the grad_accum micro-batches of optimizer step k (counted from this
        rollout's first step). Pass e = k // steps_per_epoch uses permutation (seed, phase, e);
        the last step of a pass wraps to the pass's first rows so every micro-batch is full."""
        n = len(self)
        micro, per_epoch = _micro_and_steps(n, batch_size, grad_accum)
        epoch, j = divmod(k, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + self.phase * 7_919 + epoch)
        perm = torch.randperm(n, generator=g)
        idx = perm[(torch.arange(j * micro * grad_accum, (j + 1) * micro * grad_accum)) % n]
        return list(idx.view(grad_accum, micro))

    def minibatches(self, batch_size: int, grad_accum: int, seed: int, epochs: int = 1):
        """Every optimizer step of `epochs` passes: a list (per step) of lists (per micro-batch) of row indices."""
        per_epoch = _micro_and_steps(len(self), batch_size, grad_accum)[1]
        return [self.step_rows(k, batch_size, grad_accum, seed) for k in range(epochs * per_epoch)]

    # ------------------------------------------------------------ disk

    def save(self, path: Path) -> None:
        """safetensors, written under a temporary name and renamed (a kill leaves no torn file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).contiguous() for n in self.TENSORS if getattr(self, n) is not None}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"phase": str(self.phase), "meta": json.dumps(self.meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RolloutBuffer":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata()
        tensors = load_file(str(path))
        return cls(phase=int(info["phase"]), meta=json.loads(info["meta"]), **tensors)


def _micro_and_steps(n: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    micro = max(1, min(batch_size, math.ceil(n / grad_accum)))
    return micro, max(1, math.ceil(n / (micro * grad_accum)))


def steps_per_rollout(n_rows: int, batch_size: int, grad_accum: int, epochs: int) -> int:
    """S: optimizer steps that consume one rollout of n_rows rows."""
    return epochs * _micro_and_steps(n_rows, batch_size, grad_accum)[1]


# ---------------------------------------------------------------- the schedule


class Rollouts:
    """get_batch(step, micro) for the loop: makes rollout p = step // S when its first step asks
    for it (`make(phase, step) -> RolloutBuffer`), saves it, and on resume reloads it.

    get_state/set_state carry a stage's own evolving state (the adaptive KL coefficient) in each
    buffer's metadata: buffer p holds the state *after* rollout p was made."""

    def __init__(self, folder: Path, n_rows: int, batch_size: int, grad_accum: int, epochs: int, seed: int,
                 make: Callable[[int, int], RolloutBuffer], *, resume: bool = False, ckpt_dir: Path | None = None,
                 get_state: Callable[[], dict] | None = None, set_state: Callable[[dict], None] | None = None):
        self.folder, self.n_rows, self.seed, self.make = Path(folder), n_rows, seed, make
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.S = steps_per_rollout(n_rows, batch_size, grad_accum, epochs)
        self.ckpt_dir = ckpt_dir
        self.get_state, self.set_state = get_state or dict, set_state or (lambda state: None)
        self.buffer: RolloutBuffer | None = None
        self.fresh = True                # nothing made or loaded yet in this process
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)   # a fresh start never reads another run's rollouts

    def path(self, phase: int) -> Path:
        return self.folder / f"rollout_{phase}.safetensors"

    def __call__(self, step: int, micro: int, ctx=None) -> dict:
        phase, k = divmod(step, self.S)
        if self.buffer is None or self.buffer.phase != phase:
            self.buffer = self._get(phase, step)
        rows = self.buffer.step_rows(k, self.batch_size, self.grad_accum, self.seed)[micro]
        return self.buffer.batch(rows)

    def _get(self, phase: int, step: int) -> RolloutBuffer:
        if self.path(phase).is_file():            # only after a resume: made by the killed run
            buf = RolloutBuffer.load(self.path(phase))
            self.set_state(buf.meta)
        else:
            if self.fresh and phase > 0 and self.path(phase - 1).is_file():
                self.set_state(RolloutBuffer.load(self.path(phase - 1)).meta)
            buf = self.make(phase, step)
            buf.meta = {**buf.meta, **self.get_state()}
            buf.save(self.path(phase))
            self._prune(phase)
        self.fresh = False
        return buf

    def _prune(self, phase: int) -> None:
        """Keep the rollouts a resume from the last saved checkpoint could still need."""
        keep_from = 0
        state = Path(self.ckpt_dir or "") / "train_state.json"
        if self.ckpt_dir and state.is_file():
            keep_from = json.loads(state.read_text())["step"] // self.S - 1
        for p in self.folder.glob("rollout_*.safetensors"):
            q = int(p.stem.split("_")[1])
            if q < keep_from and q != phase:
                p.unlink()

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def replace_tensors(buf: RolloutBuffer, **tensors) -> RolloutBuffer:
    return dataclasses.replace(buf, **tensors)
