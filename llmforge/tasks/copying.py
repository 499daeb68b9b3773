"""Copy drills: the user gives a string, the assistant writes it back exactly.

Most tasks quote the question in the answer: the numbers go into the calculator call, the
tool's result goes into the sentence after it, the name and city go into the JSON. A model
that cannot copy from its context fails all of them however well it knows the format
(measured: "[result: 55278] The answer is 57578."). These drills give the model copying to
practise on content that cannot leak into any evaluation: random digit strings, expressions
and made-up words (syllable strings checked against every word, name and city the tasks use).
Measured so far (README): they neither helped nor hurt at the speedrun's scale (3,000 in
midtraining left the base model's copy probe unchanged; SFT keeps 3,000 of them). What copying
needs first is an induction head (bench/copy_formation.py), and that takes more steps: with a
quarter of every pretraining batch random spans each repeated (tried, code not kept) none formed
in the preset's 500 steps either (copy probe 0%), held-out bpb went 1.61 -> 1.70 and the SFT model
scored 25% against 31%.

    "Repeat exactly: 55278"                      -> "55278"
    "Copy this: Dovika, 47, Mebaruto"            -> "Dovika, 47, Mebaruto"
"""
from __future__ import annotations

import functools
import random

from llmforge.tasks.base import say, user

ASKS = ["Repeat exactly: {s}", "Copy this: {s}", "Say back: {s}", "Echo: {s}", "Write this again: {s}",
        "Repeat after me: {s}", "Type this back to me: {s}", "Copy exactly, nothing else: {s}"]
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@functools.lru_cache(maxsize=1)
def _task_vocabulary() -> frozenset[str]:
    """Every word, name and city any task draws from (both sides), lower-cased: made-up words
    must never be one of them."""
    from llmforge.tasks.extract import CITIES, NAMES
    from llmforge.tasks.words import WORDS
    return frozenset(w.lower() for w in (*NAMES, *CITIES, *WORDS))


def made_up_word(rng: random.Random, syllables: tuple[int, int] = (1, 4), capital: float = 0.5) -> str:
    """A pronounceable string no task draws from ("Dovika"), capitalised with probability `capital`."""
    while True:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables)))
        if word not in _task_vocabulary():
            return word.capitalize() if rng.random() < capital else word


def made_up_name(rng: random.Random) -> str:
    """A made-up proper name whose first letter is any of A-Z ("Osove", "Ynugi", "Hkamu"): names in a
    sentence start with a space-glued capital (" J", "u", "pe", "ka") and in a JSON string with a
    bare one ("J", ...), so copying a name needs that map for every letter, not only for the
    consonants made_up_word starts with."""
    while True:
        name = rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + made_up_word(rng, (1, 2), capital=0.0)
        if name.lower() not in _task_vocabulary():
            return name


def _digits(rng: random.Random) -> str:
    n = rng.randint(1, 7)
    return str(rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1))


def copy_content(rng: random.Random) -> str:
    """One string to copy: a number, an expression, a list, made-up words, or a mix."""
    kind = rng.randrange(5)
    if kind == 0:
        return _digits(rng)
    if kind == 1:
        return f"{_digits(rng)}{rng.choice('+-*')}{_digits(rng)}"
    if kind == 2:
        return rng.choice([", ", " ", "; "]).join(_digits(rng) for _ in range(rng.randint(2, 5)))
    if kind == 3:
        return " ".join(made_up_word(rng) for _ in range(rng.randint(1, 3)))
    return ", ".join([made_up_word(rng), _digits(rng), made_up_word(rng)])


def copy_drills(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations that copy a random string from the request into the answer."""
    rng = random.Random(f"copying:{seed}")
    return [user(rng.choice(ASKS).format(s=s)) + say(s) for s in (copy_content(rng) for _ in range(n))]
