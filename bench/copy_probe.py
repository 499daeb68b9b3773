"""Can a checkpoint copy from its context? The induction-head test (Olsson et al. 2022) plus the
copies the assistant tasks need, side by side for any number of checkpoints.

    python bench/copy_probe.py runs/cpu/ckpt/base runs/cpu/ckpt/sft

Four probes, all on text no training set contains (seeded random draws):
  - repeat:  a run of L random non-special tokens, then the same run again. A model with
             induction heads predicts the second run far better than the first; reported as
             the loss on each half and top-1 accuracy on the second ("copy acc").
  - digits:  a 3-7 digit number, some filler text, then the same number again: per-token top-1
             accuracy when the number is repeated (what a calculator call or an answer needs).
  - names:   "NAME moved to CITY. ... NAME moved to CITY" with unseen capitalised strings:
             top-1 accuracy on the repeated name and city tokens (what JSON extraction needs).
  - chat:    "Repeat exactly: <random number / made-up word>" in the chat format: top-1 accuracy
             on the answer's tokens (teacher-forced), on strings no copy drill trained on.
A model that cannot copy scores near chance on the repeats; that caps every task that quotes
the question in its answer.
"""
from __future__ import annotations

import argparse
import random

import torch

from llmforge.tasks.copying import copy_drills
from llmforge.tokenizer.chat import END, SPECIALS, render
from llmforge.train.checkpoint import load_model, load_tokenizer


@torch.no_grad()
def token_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position loss, per-position top-1 hit) of predicting ids[:, 1:] from ids[:, :-1]."""
    logits = model(ids[:, :-1])
    logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return loss, (logits.argmax(-1) == ids[:, 1:]).float()


def repeat_probe(model, tok, n: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    specials = {tok.token_id(s) for s in SPECIALS}
    pool = torch.tensor([i for i in range(tok.vocab_size) if i not in specials])
    run = pool[torch.randint(0, len(pool), (n, length), generator=g)]
    ids = torch.cat([torch.full((n, 1), tok.eot_id), run, run], dim=1)
    loss, hit = token_loss(model, ids)
    first, second = slice(1, length), slice(length + 1, 2 * length)   # skip the unpredictable first token
    return {"first_loss": loss[:, first].mean().item(), "second_loss": loss[:, second].mean().item(),
            "copy_acc": hit[:, second].mean().item()}


FILLER = ["Here is some text in between.", "Let me write a few words here.", "Nothing to see.",
          "The weather is fine today, and the sky is blue.", "Please keep reading."]


def _repeat_accuracy(model, tok, pairs: list[tuple[str, str, str]]) -> float:
    """Each (prefix, target, filler): accuracy on the target's tokens when prefix+target recurs."""
    hits, total = 0.0, 0
    for prefix, target, filler in pairs:
        first = tok.encode(prefix + target + ". " + filler + " ")
        again = tok.encode(prefix + target)
        head = tok.encode(prefix)
        tgt = again[len(head):] if again[:len(head)] == head else again[-len(tok.encode(target)):]
        ids = torch.tensor([[tok.eot_id] + first + again])
        _, hit = token_loss(model, ids)
        k = len(tgt)
        hits += hit[0, -k:].sum().item()
        total += k
    return hits / max(total, 1)


def digit_probe(model, tok, n: int, seed: int) -> float:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        number = str(rng.randint(10 ** (rng.randint(3, 7) - 1), 10 ** 7))
        pairs.append(("The number is ", number, rng.choice(FILLER)))
    return _repeat_accuracy(model, tok, pairs)


def name_probe(model, tok, n: int, seed: int) -> float:
    rng = random.Random(seed)
    letters = "bcdfghjklmnprstvz"
    vowels = "aeiou"

    def word() -> str:
        return "".join(rng.choice(letters) + rng.choice(vowels) for _ in range(rng.randint(2, 3))).capitalize()

    pairs = [(f"{word()} moved to ", word(), rng.choice(FILLER)) for _ in range(n)]
    # the name recurs too: accuracy is on the city only, which has to come from the context
    return _repeat_accuracy(model, tok, pairs)


def chat_probe(model, tok, n: int, seed: int) -> float:
    end = tok.token_id(END)
    hits, total = 0.0, 0
    for conv in copy_drills(n, seed=10_000 + seed):    # training drills use the stage seeds
        ids, mask = render(tok, conv)
        _, hit = token_loss(model, torch.tensor([ids]))
        keep = torch.tensor([m == 1 and i != end for i, m in zip(ids[1:], mask[1:])])
        hits += hit[0][keep].sum().item()
        total += int(keep.sum())
    return hits / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint folders or run directories")
    ap.add_argument("--n", type=int, default=64, help="sequences per probe")
    ap.add_argument("--length", type=int, default=48, help="repeat probe: tokens per run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"{'checkpoint':40s} {'1st loss':>9s} {'2nd loss':>9s} {'copy acc':>9s} {'digits':>7s} {'names':>7s} {'chat':>7s}")
    for path in args.checkpoints:
        model, _, folder = load_model(path)
        model.eval()
        tok = load_tokenizer(folder)
        r = repeat_probe(model, tok, args.n, args.length, args.seed)
        d = digit_probe(model, tok, args.n, args.seed)
        nm = name_probe(model, tok, args.n, args.seed)
        ch = chat_probe(model, tok, args.n, args.seed)
        print(f"{str(folder):40s} {r['first_loss']:9.2f} {r['second_loss']:9.2f} {r['copy_acc']:9.1%} "
              f"{d:7.1%} {nm:7.1%} {ch:7.1%}", flush=True)


if __name__ == "__main__":
    main()
