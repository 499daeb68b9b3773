"""Word tasks: count a letter in a word, reverse a word, sort a short list of numbers; and the
spelling drills.

A BPE model sees "mirror" as two or three tokens, not six letters, and a 4-layer model cannot
sort in its head, so these tasks answer the way a careful person with a computer would: through
the Python tool (infer/tools.py), then say the result in words.
    "How many r's are in 'mirror'?"  -> python: print('mirror'.count('r'))  -> 3
                                     -> "The letter 'r' appears 3 times."
    "Spell lemon backwards."         -> python: print('lemon'[::-1])  -> nomel  -> "Backwards: nomel."
    "Sort 9, 2, 7 descending."       -> python: print(sorted([9, 2, 7], reverse=True))  -> "9, 7, 2"
What is left to the model is recognising the task and copying the word or numbers into the call.
The code opens with a comment that names the task ("# reverse", "# descending"): the choice is
made first, while the model reads the request, and the flag that follows it (`[::-1]` or
`.count(`, `reverse=True` or not) then copies a word two tokens back. Without it, "from low to
high" had to steer `reverse=True` from far away, after the numbers were copied (the 866-step
run's sort answers were in the wrong order in half of its failures).
Measured on one base (README, Results), 500 SFT steps, 100 held-out items per task: the tool
took reverse 0% -> 18%, sort 1% -> 15% and count 43% -> 51% against answers that spelled the
word out letter by letter ("Spelled out: m-i-r-r-o-r. ...") and sorted in the answer itself.

Half the training items ask about a corpus word (pydoc topics) rather than one of the ~150
training words, so copying the word, not remembering it, is what the training rewards.
`spelling_drills` ("Spell 'lambda'." -> "l-a-m-b-d-a") teach the token -> letters map on words of
the corpus, never on the words reserved for evaluation.
"""
from __future__ import annotations

import functools
import re

from llmforge.tasks.base import Item, Task, answer_text, ints_in, last_int, python_answer, say, user
from llmforge.tasks.phrasing import compose, pick, quote, side, split_pool

WORDS = sorted(set("""apple banana cherry orange lemon mango grape melon peach plum pear berry
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
committee mississippi bookkeeper assessment
anchor bakery barrel beetle bucket cactus camera carpet carrot cattle cellar cement
circle closet cotton cousin cradle crayon dinner doorway eagle engine fabric feather
finger flower forest fossil garage ginger goblin gravel guitar hazard helmet hollow
insect jungle kettle lantern lizard lobster magnet marble meadow medal needle nephew
office oyster paddle palace parcel parrot pebble pepper pirate pocket potato puzzle
rainbow raisin ribbon saddle salmon sandal shadow shovel silver spider stable
sweater tablet temple thread ticket timber tomato towel tractor trophy tulip velvet
walnut whistle willow wrench""".split()))
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

COUNT_CORES = [
    "How many times does the letter {l} appear in {w}?", "Count the letter {l} in the word {w}.",
    "How many {l} letters are in {w}?", "In the word {w}, how many times do you see {l}?",
    "Count how often {l} occurs in {w}.", "How often does {l} show up in {w}?",
    "Number of {l} in {w}?", "Does {w} contain the letter {l}? How many times?",
    "Tell me how many {l} letters {w} has.", "What is the count of {l} in {w}?",
    "How many copies of the letter {l} does {w} have?", "Letter {l} in {w}: how many?",
    "Can you count every {l} in {w}?", "I want to know how many times {l} is in {w}.",
    "Count the {l} letters in {w}, please.", "{w}: how many {l}?", "How many times is {l} used in {w}?",
    "Tell me the number of {l} in {w}.", "If you spell {w}, how many {l} do you write?",
    "What's the number of times {l} appears in {w}?", "Find how many {l} are in the word {w}.",
    "Check {w} for the letter {l}: how many are there?", "Give me the count of {l} in {w}.",
    "How many {l} can you find in {w}?", "In {w}, count the {l}.",
    "Could you tell me how often the letter {l} occurs in {w}?", "Quick count: {l} in {w}?",
    "Is {l} in {w}? Count them.", "How frequently does {l} appear in the word {w}?",
    "Please count occurrences of {l} in {w}.", "Work out how many times {w} contains {l}.",
    "What number of {l} letters appear in {w}?", "Count every {l} you see in {w}.",
]
REVERSE_CORES = [
    "Reverse the word {w}.", "Spell {w} backwards.", "Write {w} in reverse order.",
    "What is {w} spelled backwards?", "Can you write {w} back to front?", "Reverse the letters of {w}.",
    "How do you spell {w} in reverse?", "Flip the word {w} around.", "Give me {w} reversed.",
    "Write the letters of {w} from last to first.", "What does {w} look like backwards?",
    "Turn {w} around, letter by letter.", "Read {w} from right to left.",
    "Write {w} backwards.", "Please reverse {w}.", "What's {w} in reverse?", "Reverse this word: {w}",
    "Spell the word {w} from the end to the start.", "Show me {w} written backwards.",
    "How does {w} read in reverse?", "Could you turn {w} back to front?", "Mirror the letters of {w}.",
    "{w} backwards, please.", "Give me the reverse of {w}.", "Invert the order of the letters in {w}.",
    "What do you get if you reverse {w}?", "Reverse {w} for me.", "Write the word {w} right to left.",
    "Backwards, how is {w} spelled?", "Take {w} and reverse it.", "Can you spell {w} in reverse order?",
    "Print {w} reversed.", "I need {w} spelled backwards.",
]
SORT_CORES = [
    "Sort in {order} order: {nums}", "Put these numbers in {order} order: {nums}.",
    "Arrange {nums} in {order} order.", "Order these from {range}: {nums}.",
    "Can you sort {nums} from {range}?", "Sort the list {nums}, {order}.",
    "List {nums} from {range}.", "Rank these numbers from {range}: {nums}.",
    "Please order {nums} ({order}).", "Sort these: {nums}. I want them {order}.",
    "Rearrange {nums} so they go from {range}.", "Put {nums} in order, {range}.",
    "Sort {nums} in {order} order.", "Put {nums} in {order} order, please.",
    "Can you order these numbers from {range}? {nums}", "{nums}: sort them, {order}.",
    "Arrange these from {range}: {nums}.", "I have {nums}. Sort them from {range}.", "Sort {nums} from {range}.",
    "Give me {nums} sorted in {order} order.", "Line up {nums} from {range}.", "What is {nums} in {order} order?",
    "Order the numbers {nums}, {order}.", "Reorder {nums} from {range}.", "Sort this list, {order}: {nums}",
    "Help me sort {nums} from {range}.", "Rank {nums} in {order} order.",
    "Please sort the numbers {nums} from {range}.", "Could you put {nums} in {order} order?",
    "Organise {nums} from {range}.", "List these in {order} order: {nums}.", "Sort, {order}: {nums}",
    # no order asked: ascending, as `sorted` and people do by default
    "Sort these numbers: {nums}", "Can you sort {nums}?", "Put {nums} in order.", "Sort {nums}.",
    "Please sort this list: {nums}", "Could you order these numbers: {nums}?",
]
ORDER_WORDS = {"ascending": (["ascending", "increasing"], ["smallest to largest", "low to high", "least to greatest"]),
               "descending": (["descending", "decreasing"], ["largest to smallest", "high to low", "greatest to least"])}


def spelled(word: str) -> str:
    return "-".join(word)


def task_words(split: str) -> list[str]:
    """The letter tasks' words on one side (salt shared by both letter tasks, so a word held
    out for counting is never reversed in training either)."""
    return split_pool(WORDS, split, "words")


CORPUS_WORD_SHARE = 0.5   # training items of the letter tasks that take a corpus word instead


def letter_task_word(rng, split: str) -> str:
    """The word a letter task asks about. Half the training items take one of the ~2,800 corpus
    words instead of the ~150 training words, so the model copies the word it is asked about
    into its tool call rather than one it remembers (never an evaluation word either way)."""
    if split == "train" and rng.random() < CORPUS_WORD_SHARE:
        return rng.choice(corpus_words())
    return rng.choice(task_words(split))


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Lower-case words of 3-12 letters from the pydoc topics (part of the pretraining corpus),
    minus every word the letter tasks may evaluate on."""
    try:
        from pydoc_data.topics import topics
        text = " ".join(topics.values())
    except ImportError:   # some distributions strip pydoc_data
        text = ""
    found = set(re.findall(r"\b[a-z]{3,12}\b", text)) | set(task_words("train"))
    return tuple(sorted(found - set(task_words("eval"))))


def spelling_drills(n: int, seed: int = 0) -> list[list[dict]]:
    """n short conversations that spell a corpus word ("Spell 'lambda'." -> "l-a-m-b-d-a")."""
    import random
    rng = random.Random(f"spelling:{seed}")
    words = corpus_words()
    asks = ["Spell {w}.", "How do you spell {w}?", "Spell out {w} letter by letter.", "Letters of {w}?"]
    return [user(rng.choice(asks).format(w=quote(rng, w))) + say(spelled(w))
            for w in (rng.choice(words) for _ in range(n))]


class CountLetter(Task):
    name = "count_letter"

    def make(self, rng, split):
        word = letter_task_word(rng, split)
        # a balanced mix of answers (0, 1, 2+), so that always saying "1" scores poorly
        repeated = sorted({c for c in word if word.count(c) > 1})
        absent = sorted(set(ALPHABET) - set(word))
        kinds = [absent, sorted(set(word) - set(repeated))] + ([repeated] if repeated else [])
        letter = rng.choice(rng.choice([k for k in kinds if k]))
        count = word.count(letter)
        core = pick(rng, COUNT_CORES, split, "count").format(l=quote(rng, letter), w=quote(rng, word))
        times = "time" if count == 1 else "times"
        gold = python_answer(f"# count\nprint('{word}'.count('{letter}'))", f"{count}\n",
                             f"The letter '{letter}' appears {count} {times}.")
        return user(compose(rng, split, core)), count, gold

    def verify(self, item: Item, response) -> float:
        return float(last_int(answer_text(response)) == item.reference)


class ReverseWord(Task):
    name = "reverse_word"

    def make(self, rng, split):
        word = letter_task_word(rng, split)
        core = pick(rng, REVERSE_CORES, split, "reverse").format(w=quote(rng, word))
        gold = python_answer(f"# reverse\nprint('{word}'[::-1])", f"{word[::-1]}\n", f"Backwards: {word[::-1]}.")
        return user(compose(rng, split, core)), word[::-1], gold

    def verify(self, item: Item, response) -> float:
        """The last word of the answer, or its last hyphen-spelled run (e-l-p-p-a), must be the
        reversed word."""
        runs = re.findall(r"[A-Za-z](?:-[A-Za-z])+|[A-Za-z]+", answer_text(response))
        return float(bool(runs) and runs[-1].replace("-", "").lower() == item.reference)


class SortNumbers(Task):
    name = "sort_numbers"
    max_new_tokens = 72     # five numbers copied twice (the code and the answer): up to ~64 tokens

    def make(self, rng, split):
        while True:
            numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
            # the set of numbers is on one side: no held-out list is ever sorted in training
            if len(set(numbers)) == len(numbers) and side(tuple(sorted(numbers)), "sort") == split:
                break
        core = pick(rng, SORT_CORES, split, "sort")
        order = rng.choice(["ascending", "descending"]) if "{order}" in core or "{range}" in core else "ascending"
        adjectives, ranges = ORDER_WORDS[order]
        sep = rng.choice([", ", ", ", " ", "; "])
        core = core.format(order=rng.choice(adjectives), range=rng.choice(ranges), nums=sep.join(map(str, numbers)))
        answer = sorted(numbers, reverse=order == "descending")
        code = f"# {order}\nprint(sorted({numbers}{', reverse=True' if order == 'descending' else ''}))"
        return user(compose(rng, split, core)), answer, python_answer(code, f"{answer}\n", ", ".join(map(str, answer)))

    def verify(self, item: Item, response) -> float:
        return float(ints_in(answer_text(response)) == item.reference)

