"""What a synthetic verifiable task is, and how train and held-out items are kept apart.

A task turns (seed, split) into an Item: the prompt messages, a reference the verifier checks
against, and a gold response (assistant-side messages) for SFT. `verify(item, response)`
grades the messages the model produced after the prompt and returns a reward in [0, 1].

Train / held-out separation is by phrasing AND by content: `make(rng, split)` draws its
templates, openers, closers and content (words, names, numbers, requests) only from `split`'s
side of every pool (tasks/phrasing.py), so no held-out question is worded, or about anything,
the way a training conversation was. Seeds are separate too: train items come from seeds
[0, HELDOUT_SEED0), held-out items from seeds >= HELDOUT_SEED0; held-out items are distinct
from each other, so accuracy is over distinct prompts.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field

from llmforge.errors import UserError
from llmforge.tokenizer.chat import final_answer

HELDOUT_SEED0 = 1_000_000_000
VALIDATION_SEED0 = 1_500_000_000
TEST_ITEMS = 200          # validation never repeats a prompt among the first this-many held-out items


@dataclass
class Item:
    task: str
    seed: int
    prompt: list[dict]               # messages up to the model's turn
    reference: object                # what the verifier checks against (JSON-able)
    gold: list[dict]                 # assistant-side messages of a correct answer
    safety_relevant: bool = False    # routes reward to the safety RM (Llama 2)
    meta: dict = field(default_factory=dict)
    split: str = "train"             # which side of the phrasing/content pools it was drawn from

    @property
    def conversation(self) -> list[dict]:
        return self.prompt + self.gold

    @property
    def content_hash(self) -> str:
        text = "\x1f".join(f"{m['role']}:{m.get('content') or ''}" for m in self.prompt)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Task:
    """Subclasses set `name` and implement make(rng, split) -> (prompt, reference, gold[, safety])
    and verify(item, response) -> reward in [0, 1]."""

    name = "task"
    max_new_tokens = 64     # answer budget: tool calls count, tool results do not; the gold's longest is well inside

    def make(self, rng: random.Random, split: str):
        raise NotImplementedError

    def verify(self, item: Item, response: list[dict]) -> float:
        raise NotImplementedError

    def generate(self, seed: int, split: str = "train") -> Item:
        rng = random.Random(f"{self.name}:{split}:{seed}")
        made = self.make(rng, split)
        prompt, reference, gold = made[:3]
        safety = made[3] if len(made) > 3 else False
        return Item(self.name, seed, prompt, reference, gold, safety, split=split)

    def _items(self, n: int, seed0: int, split: str, exclude: frozenset = frozenset()) -> list[Item]:
        """n items from seeds seed0..; held-out items are distinct from each other and from
        `exclude` (a task with a small content space may return fewer than n)."""
        items, seen, seed = [], set(exclude), seed0
        limit = seed0 + 50 * n + 1000
        while len(items) < n and seed < limit:
            item = self.generate(seed, split)
            seed += 1
            if split == "eval":
                if item.content_hash in seen:
                    continue
                seen.add(item.content_hash)
            items.append(item)
        return items

    def train_items(self, n: int, offset: int = 0) -> list[Item]:
        return self._items(n, offset, "train")

    def heldout_items(self, n: int) -> list[Item]:
        """The test set: evaluation-side phrasings and content, reported by `llmforge eval`."""
        return self._items(n, HELDOUT_SEED0, "eval")

    def validation_items(self, n: int) -> list[Item]:
        """For choosing checkpoints (RL's best step): evaluation-side phrasings and content too,
        but other prompts than the test set's, so selection does not tune on the test items."""
        test = frozenset(i.content_hash for i in self.heldout_items(TEST_ITEMS))
        return self._items(n, VALIDATION_SEED0, "eval", exclude=test)


# ---------------------------------------------------------------- registries

def lookup(registry: dict, name: str, what: str = "task"):
    """registry[name], or a UserError listing the names there are."""
    if name not in registry:
        raise UserError(f"unknown {what} '{name}'; choose from {', '.join(registry)}")
    return registry[name]


def names_in(registry: dict, spec: str, what: str = "task") -> list[str]:
    """'' or 'all' -> every name of the registry; otherwise a comma-separated list, validated."""
    if not spec or spec == "all":
        return list(registry)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        lookup(registry, n, what)
    return names


# ---------------------------------------------------------------- helpers for verifiers

_INT = re.compile(r"-?\d+")


def ints_in(text: str) -> list[int]:
    return [int(x) for x in _INT.findall(text)]


def last_int(text: str):
    found = ints_in(text)
    return found[-1] if found else None


def first_int(text: str):
    found = ints_in(text)
    return found[0] if found else None


def answer_text(response: list[dict]) -> str:
    return final_answer(response).strip()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def say(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def tool_answer(name: str, arguments: dict, result: str, final: str) -> list[dict]:
    """Gold that works through a tool: the call, the result the engine feeds back (exactly as
    the tool returns it), then the answer in a sentence."""
    return [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": final},
    ]


def python_answer(code: str, printed: str, final: str) -> list[dict]:
    """Gold through the Python tool: the code, what it prints, then the answer in words."""
    return tool_answer("python", {"code": code}, printed, final)
