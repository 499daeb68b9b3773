"""LoRA vs full fine-tuning on the same synthetic task, same base, same number of steps.

    python bench/lora_vs_full.py                       # a few minutes on 2 idle CPU cores
    python bench/lora_vs_full.py --steps 300 --rank 16 --targets q_proj,v_proj --task reverse

1. A base model is pretrained on a COPY task: `<|bos|> x1..xn SEP x1..xn`.
2. From that same base, two fine-tunes learn a new task, loss on the answer tokens only (as SFT
   puts loss on assistant tokens only): SHIFT `<|bos|> x1..xn SEP s(x1)..s(xn)` with s the next
   symbol (a small change of behaviour, like most fine-tunes), or REVERSE `... SEP xn..x1`:
     full: every parameter trained (AdamW, lr --full-lr)
     lora: frozen base + rank-r adapters (llmforge.model.lora, lr --lora-lr: LoRA usually wants
           a larger learning rate than full fine-tuning, Hu et al. 2021)
3. Prints, for each: trainable parameters, final held-out answer loss, exact-match accuracy
   (greedy answer entirely right) and wall time. Nothing is asserted: this is a measurement.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from llmforge.config import ModelConfig
from llmforge.model.lora import add_lora, trainable_parameters
from llmforge.model.transformer import Transformer

BOS, SEP, FIRST = 0, 1, 2  # token ids; symbols are FIRST..vocab-1


def batch(n: int, length: int, vocab: int, task: str, gen: torch.Generator):
    """(inputs, targets, loss mask) for `n` sequences of `task` (copy | reverse)."""
    x = torch.randint(FIRST, vocab, (n, length), generator=gen)
    answer = {"copy": x, "reverse": x.flip(1), "shift": (x - FIRST + 1) % (vocab - FIRST) + FIRST}[task]
    seq = torch.cat([torch.full((n, 1), BOS), x, torch.full((n, 1), SEP), answer], dim=1)
    mask = torch.zeros_like(seq)
    mask[:, length + 2:] = 1  # the answer
    return seq[:, :-1], seq[:, 1:], mask[:, 1:]


def train(model, steps: int, lr: float, task: str, args, seed: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup then linear decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        x, y, m = batch(args.batch, args.length, args.vocab, task, gen)
        _, loss = model(x, targets=y, loss_mask=m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, task: str, args) -> tuple[float, float]:
    """(answer loss, exact-match accuracy of greedy answers) on 256 held-out sequences."""
    model.eval()
    x, y, m = batch(256, args.length, args.vocab, task, torch.Generator().manual_seed(12345))
    logits, loss = model(x, targets=y, loss_mask=m)
    # teacher-forced greedy == free-running greedy exactly when every answer token is right
    right = ((logits.argmax(-1) == y) | (m == 0)).all(dim=1)
    return float(loss), float(right.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("shift", "reverse"), default="shift", help="the fine-tuning task")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps (both runs)")
    ap.add_argument("--base-steps", type=int, default=200, help="pretraining steps of the shared base")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 suits these tiny models (2 threads on a busy 2-core CPU thrash)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=args.vocab, n_layer=3, n_head=4, n_kv_head=2, d_model=96,
                      max_seq_len=2 * args.length + 2)
    base = Transformer(cfg)
    t = train(base, args.base_steps, 3e-3, "copy", args, seed=args.seed)
    copy_loss, copy_acc = evaluate(base, "copy", args)
    new_loss, new_acc = evaluate(base, args.task, args)
    print(f"base: {base.num_params():,} params, pretrained on copy in {t:.0f}s: copy loss {copy_loss:.3f} "
          f"acc {copy_acc:.2f}; {args.task} (before fine-tuning) loss {new_loss:.3f} acc {new_acc:.2f}")

    rows = []
    full = copy.deepcopy(base)
    t = train(full, args.steps, args.full_lr, args.task, args, seed=args.seed + 1)
    rows.append(("full", *trainable_parameters(full), *evaluate(full, args.task, args), t))
    lora = add_lora(copy.deepcopy(base), args.rank, args.alpha, args.targets)
    t = train(lora, args.steps, args.lora_lr, args.task, args, seed=args.seed + 1)
    rows.append((f"lora r={args.rank} {args.targets}", *trainable_parameters(lora), *evaluate(lora, args.task, args), t))

    print(f"\nfine-tune on {args.task}, {args.steps} steps, batch {args.batch}")
    print(f"{'run':<28}{'trainable':>12}{'share':>8}{'loss':>8}{'acc':>7}{'time':>8}")
    for name, trainable, total, loss, acc, secs in rows:
        print(f"{name:<28}{trainable:>12,}{trainable / total:>8.1%}{loss:>8.3f}{acc:>7.2f}{secs:>7.0f}s")
    (_, _, _, full_loss, _, _), (_, _, _, lora_loss, _, _) = rows
    print(f"\nLoRA final loss minus full fine-tune: {lora_loss - full_loss:+.3f} nats/token, "
          f"with {rows[1][1] / rows[0][1]:.1%} of the trainable parameters")


if __name__ == "__main__":
    main()
