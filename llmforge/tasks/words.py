"""Word tasks: count a letter in a word, reverse a word, sort a short list of numbers."""
from __future__ import annotations

import re

from llmforge.tasks.base import Item, Task, answer_text, ints_in, last_int, say, user

WORDS = """apple banana cherry orange lemon mango grape melon peach plum pear berry
house garden window table chair pillow blanket mirror kitchen bottle basket candle
river mountain forest desert island valley ocean meadow canyon glacier volcano
yellow purple silver golden crimson violet scarlet
rabbit turtle monkey donkey parrot tiger zebra giraffe kitten puppy falcon dolphin
pencil rocket planet comet galaxy number letter button ladder hammer wallet jacket
summer winter autumn spring morning evening tonight weekend
doctor farmer painter sailor teacher baker artist singer driver
happy simple gentle little bright quiet clever brave strong proud
music guitar violin piano trumpet drummer poetry theater cinema
coffee butter cheese bread pepper sugar cookie muffin noodle pickle
dragon castle wizard knight tunnel bridge harbor market street school
letter yellow balloon committee mississippi bookkeeper assessment""".split()
WORDS = sorted(set(WORDS))


class CountLetter(Task):
    name = "count_letter"

    def make(self, rng):
        word = rng.choice(WORDS)
        # a balanced mix of answers (0, 1, 2+), so that always saying "1" scores poorly
        repeated = sorted({c for c in word if word.count(c) > 1})
        absent = sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word))
        kinds = [absent, sorted(set(word) - set(repeated))] + ([repeated] if repeated else [])
        letter = rng.choice(rng.choice([k for k in kinds if k]))
        count = word.count(letter)
        phrasing = rng.choice(["How many times does the letter '{l}' appear in '{w}'?",
                               "Count the letter '{l}' in the word '{w}'."])
        return user(phrasing.format(l=letter, w=word)), count, say(str(count))

    def verify(self, item: Item, response) -> float:
        return float(last_int(answer_text(response)) == item.reference)


class ReverseWord(Task):
    name = "reverse_word"

    def make(self, rng):
        word = rng.choice(WORDS)
        phrasing = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write '{w}' in reverse order."])
        return user(phrasing.format(w=word)), word[::-1], say(word[::-1])

    def verify(self, item: Item, response) -> float:
        answer = re.sub(r"[^a-z]", "", answer_text(response).lower().split(".")[0])
        return float(answer == item.reference)


class SortNumbers(Task):
    name = "sort_numbers"

    def make(self, rng):
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        order = rng.choice(["ascending", "descending"])
        answer = sorted(numbers, reverse=order == "descending")
        prompt = f"Sort in {order} order: {', '.join(map(str, numbers))}"
        return user(prompt), answer, say(", ".join(map(str, answer)))

    def verify(self, item: Item, response) -> float:
        return float(ints_in(answer_text(response)) == item.reference)
