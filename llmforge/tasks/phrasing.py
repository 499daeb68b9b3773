"""How a request is phrased, and how training and evaluation never share a phrasing or content.

Every pool a task draws from (question templates, openers, closers, words, names, requests)
is cut in two by a stable hash of each entry: about a quarter goes to "eval", the rest to
"train". Training items only ever draw from the train half, evaluation items only from the
eval half, so a held-out question is worded by a template, an opener and a closer that no
training conversation used, about content (words, names, requests) no training conversation
mentioned. `tests/test_tasks.py` checks this on the generated text itself.

A phrasing is composed, the way people vary a request:

    [opener] core-template-with-content [closer]     then one surface style
    "Hey there! How many r's are in 'mirror'? Thanks a lot."
    "quick question: spell "lemon" backwards"

so the train side alone has thousands of distinct wordings of each task.
"""
from __future__ import annotations

import functools
import hashlib
import random
from typing import Sequence, TypeVar

SPLITS = ("train", "eval")
EVAL_SHARE = 0.25       # share of every pool reserved for evaluation

T = TypeVar("T")


def side(value, salt: str = "") -> str:
    """'eval' or 'train' for one pool entry, by a stable hash of (salt, entry)."""
    h = hashlib.sha256(f"{salt}\x1f{value!r}".encode("utf-8")).digest()
    return "eval" if int.from_bytes(h[:4], "big") / 2 ** 32 < EVAL_SHARE else "train"


def split_pool(values: Sequence[T], split: str, salt: str = "") -> list[T]:
    """The entries of `values` on `split`'s side. Both sides are non-empty for pools of >= 2."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_split(tuple(values), split, salt))


@functools.lru_cache(maxsize=4096)
def _split(values: tuple, split: str, salt: str) -> tuple:
    values = list(dict.fromkeys(values))
    mine = [v for v in values if side(v, salt) == split]
    if not mine and len(values) >= 2:   # a tiny pool the hash put on one side: still disjoint
        ordered = sorted(values, key=repr)
        mine = ordered[:1] if split == "eval" else ordered[1:]
    return tuple(mine)


# Openers and closers wrap any core request. Some are whole extra sentences (context),
# some change the register (polite, terse, chatty).
OPENERS = [
    "Hi!", "Hello!", "Hey there!", "Hi, quick question:", "Quick question:",
    "Could you help me?", "I have a question.", "Please help:", "Good morning!", "Hey,",
    "I'm studying for a test.", "I'm working on a puzzle.", "My friend asked me this.",
    "Here's a small task for you.", "Can you do something for me?", "Question:", "Task:",
    "I was wondering:", "Help me out here.", "OK, next one.", "Let's try this:",
    "This is for my homework.", "I need a hand.", "One more thing:", "Hello again!",
    "Yo!", "Greetings.", "Dear assistant,", "Excuse me,", "Small favour:", "Here goes:",
]
CLOSERS = [
    "Thanks!", "Thank you.", "Thanks in advance.", "Please.", "Cheers!",
    "Just the answer, please.", "Be brief.", "Keep it short.", "I appreciate it.",
    "Thanks a lot.", "Much appreciated!", "No explanation needed.", "Quickly, please.",
    "That's all.", "Take your time.", "Many thanks.", "Appreciate your help!", "Go!",
    "Answer carefully.", "Please answer.", "Ta.", "Thank you kindly.",
]
STYLES = ["plain", "plain", "plain", "casual", "no_final_punct"]


def compose(rng: random.Random, split: str, core: str) -> str:
    """Wrap a filled-in core request in an opener and a closer from `split`'s pools, in one
    surface style: as written, casual (lower-case opener/closer and first letter), or without
    the final punctuation. Content inside the core (names, words) keeps its case."""
    opener = rng.choice(split_pool(OPENERS, split, "opener")) if rng.random() < 0.6 else ""
    closer = rng.choice(split_pool(CLOSERS, split, "closer")) if rng.random() < 0.5 else ""
    style = rng.choice(STYLES)
    if style == "casual":
        opener, closer, core = opener.lower(), closer.lower(), core[:1].lower() + core[1:]
    text = " ".join(part for part in (opener, core, closer) if part)
    return text.rstrip(".?!") if style == "no_final_punct" else text


def pick(rng: random.Random, values: Sequence[T], split: str, salt: str) -> T:
    """One entry of `values` from `split`'s side of the pool."""
    return rng.choice(split_pool(values, split, salt))


def quote(rng: random.Random, text: str) -> str:
    """The ways people mark a word in a request."""
    return rng.choice(["'{}'", '"{}"', "{}", "“{}”", "`{}`"]).format(text)
