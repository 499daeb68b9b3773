"""Preference pairs: JSONL records {prompt, chosen, rejected, margin?, source}.

    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}], "margin": 1.0, "source": "verifier"}

`prompt` is a list of messages (or a plain string = one user message); `chosen` and `rejected`
are the assistant-side messages that follow it (or plain strings = one assistant message).
Sources built here:
  verifier  the SFT model's own samples: a correct one (or the gold answer) over an incorrect one
  safety    refusal over compliance for harmful requests, a helpful answer over a refusal for
            benign ones (the safety reward model learns from these)
  user      the user's JSONL in this same format (rm.user_prefs); the serving feedback store
            exports this format too
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmforge.errors import UserError
from llmforge.eval import tasks as task_eval
from llmforge.run import atomic_path, read_jsonl
from llmforge.tasks import Item, get_task, task_names
from llmforge.tasks.safety import REFUSALS
from llmforge.tokenizer.chat import validate_messages

# ---------------------------------------------------------------- reading and writing


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise UserError(f'{where}: "{field}" must be a string or a list of messages; fix the record')
    validate_messages(value, f"{where} {field}")
    return value


def check_pair(record, where: str) -> dict:
    """Validate one record and normalize strings to messages."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise UserError(f'{where}: a preference pair needs "prompt", "chosen" and "rejected"; fix the record')
    pair = {"prompt": _as_messages(record["prompt"], "user", where, "prompt"),
            "chosen": _as_messages(record["chosen"], "assistant", where, "chosen"),
            "rejected": _as_messages(record["rejected"], "assistant", where, "rejected"),
            "margin": record.get("margin", 0.0), "source": record.get("source", "user"),
            "safety": bool(record.get("safety", record.get("source") == "safety"))}
    if pair["chosen"] == pair["rejected"]:
        raise UserError(f"{where}: chosen and rejected are identical, so the pair carries no preference; "
                        "drop the line or fix one side")
    if not isinstance(pair["margin"], (int, float)) or isinstance(pair["margin"], bool):
        raise UserError(f'{where}: "margin" must be a number; fix the record')
    return pair


def load_pairs(path: str | Path) -> list[dict]:
    pairs = [check_pair(record, where) for where, record in read_jsonl(path, "preference")]
    if not pairs:
        raise UserError(f"{path} holds no preference pairs; add JSONL lines or drop the option")
    return pairs


def save_pairs(path: str | Path, pairs: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- building from verifiers


def _say(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def corrupt(item: Item, rng: random.Random) -> list[dict] | None:
    """A plausible wrong answer: the gold with its last number changed, or its letters shuffled;
    for the tool task, the right number stated without calling the tool. None if no wrong
    variant was found."""
    task = get_task(item.task)
    final = item.gold[-1]["content"]
    candidates = []
    if item.task == "multiply_tool":
        candidates.append(_say(final))
    numbers = list(re.finditer(r"-?\d+", final))
    if numbers:
        m = numbers[-1]
        wrong = str(int(m[0]) + rng.choice([-10, -2, -1, 1, 2, 10]))
        candidates.append(item.gold[:-1] + _say(final[:m.start()] + wrong + final[m.end():]))
    letters = list(final)
    rng.shuffle(letters)
    candidates.append(item.gold[:-1] + _say("".join(letters)))
    for c in candidates:
        if task.verify(item, c) < 1.0:
            return c
    return None


def _compliance(item: Item) -> list[dict]:
    request = item.prompt[-1]["content"].rstrip("?.")
    return _say(f"Sure! Here is what to do: {request.lower()}. First, get what you need.")


def pairs_for(samples: list[list[task_eval.Sample]], seed: int) -> list[dict]:
    """Pairs from graded samples (one list per prompt)."""
    rng = random.Random(seed)
    pairs = []
    for row in samples:
        item = row[0].item
        source = "safety" if item.task == "safety" else "verifier"
        good = [s.messages for s in row if s.reward >= 1.0 and s.ended]
        bad = [s.messages for s in row if s.reward < 1.0 and s.messages]
        chosen = good[0] if good else item.gold
        if item.task == "safety":   # make sure refusal-vs-compliance is always present
            bad.append(_compliance(item) if item.reference["harmful"] else _say(rng.choice(REFUSALS)))
        else:
            wrong = corrupt(item, rng)
            if wrong is not None:
                bad.append(wrong)
        for rejected in bad[:2]:
            if rejected != chosen:
                pairs.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "margin": 1.0,
                              "source": source, "safety": item.safety_relevant, "task": item.task})
    return pairs


def build(cfg, run, policy, tok) -> tuple[list[dict], list[dict]]:
    """Sample the policy on train and held-out prompts, grade, and write prefs/{train,heldout}.jsonl."""
    rc = cfg.rm
    names = task_names(cfg.sft.tasks)
    train_items = [i for n in names for i in get_task(n).train_items(rc.prompts_per_task, offset=500_000)]
    heldout_items = task_eval.heldout(names, rc.heldout_per_task)
    user_pairs = load_pairs(rc.user_prefs) if rc.user_prefs else []   # fail fast, before sampling
    out = []
    for which, items, seed in (("train", train_items, rc.seed), ("heldout", heldout_items, rc.seed + 1)):
        samples = task_eval.sample(policy, tok, items, n=rc.samples_per_prompt, temperature=1.0,
                                   max_tokens=cfg.rl.max_new_tokens, seed=seed)
        pairs = pairs_for(samples, seed)
        if which == "train":
            pairs += user_pairs
        if not pairs:
            raise UserError(f"no preference pairs could be built for {which}; raise rm.prompts_per_task")
        save_pairs(run.prefs / f"{which}.jsonl", pairs)
        out.append(pairs)
    return out[0], out[1]
