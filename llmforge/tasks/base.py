"""What a synthetic verifiable task is, and how train and held-out items are kept apart.

A task turns a seed into an Item: the prompt messages, a reference the verifier checks
against, and a gold response (assistant-side messages) for SFT. `verify(item, response)`
grades the messages the model produced after the prompt and returns a reward in [0, 1].

Train / held-out separation is by seed AND by content: train items come from seeds
[0, HELDOUT_SEED0), held-out items from seeds >= HELDOUT_SEED0, and an item is only ever
used on the side its prompt hash belongs to (hash % HELDOUT_BUCKETS == 0 -> held-out). The
content rule holds for any counts, so growing the eval set never leaks train prompts.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from llmforge.tokenizer.chat import final_answer

HELDOUT_SEED0 = 1_000_000_000
HELDOUT_BUCKETS = 5          # one prompt in five (by hash) is reserved for held-out


@dataclass
class Item:
    task: str
    seed: int
    prompt: list[dict]               # messages up to the model's turn
    reference: object                # what the verifier checks against (JSON-able)
    gold: list[dict]                 # assistant-side messages of a correct answer
    safety_relevant: bool = False    # routes reward to the safety RM (Llama 2)
    meta: dict = field(default_factory=dict)

    @property
    def conversation(self) -> list[dict]:
        return self.prompt + self.gold

    @property
    def content_hash(self) -> str:
        text = "\x1f".join(f"{m['role']}:{m.get('content') or ''}" for m in self.prompt)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def is_heldout_content(self) -> bool:
        return int(self.content_hash[:8], 16) % HELDOUT_BUCKETS == 0


class Task:
    """Subclasses set `name` and implement make(rng) -> (prompt, reference, gold[, safety])."""

    name = "task"

    def make(self, rng: random.Random):
        raise NotImplementedError

    def verify(self, item: Item, response: list[dict]) -> float:
        raise NotImplementedError

    def generate(self, seed: int) -> Item:
        rng = random.Random(f"{self.name}:{seed}")
        made = self.make(rng)
        prompt, reference, gold = made[:3]
        safety = made[3] if len(made) > 3 else False
        return Item(self.name, seed, prompt, reference, gold, safety)

    def _items(self, n: int, seed0: int, heldout: bool) -> list[Item]:
        """n items from seeds seed0.. whose content is on the requested side. Held-out items are
        also distinct from each other (so accuracy is over distinct prompts); a task with a
        small content space may return fewer than n."""
        items, seen, seed = [], set(), seed0
        limit = seed0 + 50 * n + 1000
        while len(items) < n and seed < limit:
            item = self.generate(seed)
            seed += 1
            if item.is_heldout_content != heldout or (heldout and item.content_hash in seen):
                continue
            seen.add(item.content_hash)
            items.append(item)
        return items

    def train_items(self, n: int, offset: int = 0) -> list[Item]:
        return self._items(n, offset, heldout=False)

    def heldout_items(self, n: int) -> list[Item]:
        return self._items(n, HELDOUT_SEED0, heldout=True)


# ---------------------------------------------------------------- helpers for verifiers

_INT = re.compile(r"-?\d+")


def ints_in(text: str) -> list[int]:
    return [int(x) for x in _INT.findall(text)]


def last_int(text: str):
    found = ints_in(text)
    return found[-1] if found else None


def answer_text(response: list[dict]) -> str:
    return final_answer(response).strip()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def say(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]
