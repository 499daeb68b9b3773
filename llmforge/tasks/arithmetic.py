"""Arithmetic through the calculator tool: addition/subtraction and multiplication.

Answer format, chosen by measurement: a 13M-parameter model fine-tuned to answer 3-digit sums
directly scored 0% on held-out items, while the same model routing multiplications through the
calculator scored 55% (README history, issue 9). Copying two numbers into a tool call is
learnable at this size; carrying digits is not. So both tasks answer with a calculator call,
then state the result. The verifier only checks the final number, so a model that computes
correctly without the tool also scores on addsub; multiply_tool requires the call.
"""
from __future__ import annotations

import json
import random
import re

from llmforge.tasks.base import Item, Task, answer_text, last_int, tool_answer, user
from llmforge.tasks.phrasing import compose, side, split_pool

SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen twenty").split()

# (template, operators it can express). {a} {b} numbers, {op} symbol, {opw} word.
ADDSUB_CORES = [
    ("What is {a} {op} {b}?", "+-"), ("Compute {a} {op} {b}.", "+-"), ("{a} {op} {b} = ?", "+-"),
    ("Calculate {a} {opw} {b}.", "+-"), ("How much is {a} {opw} {b}?", "+-"), ("Evaluate {a}{op}{b}.", "+-"),
    ("Work out {a} {op} {b} for me.", "+-"), ("Tell me {a} {op} {b}.", "+-"), ("{a} {opw} {b} equals what?", "+-"),
    ("Find {a} {op} {b}.", "+-"), ("What's {a} {opw} {b}?", "+-"), ("Solve: {a} {op} {b}", "+-"),
    ("Add {a} and {b}.", "+"), ("What is the sum of {a} and {b}?", "+"), ("Add {b} to {a}.", "+"),
    ("If I have {a} apples and get {b} more, how many apples do I have?", "+"),
    ("A box holds {a} pens and another holds {b}. How many pens in total?", "+"),
    ("What do you get if you add {a} and {b}?", "+"), ("Sum up {a} and {b}.", "+"),
    ("Subtract {b} from {a}.", "-"), ("I had {a} dollars and spent {b}. How much is left?", "-"),
    ("What is {a} take away {b}?", "-"), ("Take {b} away from {a}. What remains?", "-"),
    ("A train has {a} seats and {b} are taken. How many are free?", "-"),
    ("What is {b} less than {a}?", "-"), ("Reduce {a} by {b}.", "-"),
    ("Could you do {a} {op} {b}?", "+-"), ("Quick maths: {a} {op} {b}", "+-"), ("I need {a} {opw} {b}.", "+-"),
    ("Result of {a} {op} {b}?", "+-"), ("Do the sum {a} {op} {b}.", "+-"), ("Please calculate {a} {op} {b}.", "+-"),
    ("{a} {opw} {b} is what?", "+-"), ("What number is {a} {opw} {b}?", "+-"), ("Give me {a} {op} {b}.", "+-"),
    ("What is {a} and {b} added together?", "+"), ("Find the total of {a} and {b}.", "+"),
    ("What's the total when you add {a} and {b}?", "+"), ("Increase {a} by {b}.", "+"),
    ("What is {b} more than {a}?", "+"), ("I scored {a} points and then {b} more. What is my score?", "+"),
    ("Please add up {a} and {b}.", "+"), ("Give me the sum of {a} and {b}.", "+"),
    ("There are {a} cats and {b} dogs. How many animals are there altogether?", "+"),
    ("Combine {a} and {b}. What is the total?", "+"), ("A shelf has {a} books and I add {b}. How many now?", "+"),
    ("Take {b} from {a}.", "-"), ("How much is left if I take {b} from {a}?", "-"), ("Decrease {a} by {b}.", "-"),
    ("I had {a} stickers and gave away {b}. How many do I have now?", "-"),
    ("What do you get when you subtract {b} from {a}?", "-"), ("Lower {a} by {b}.", "-"),
    ("A shop had {a} eggs and sold {b}. How many are left?", "-"), ("What remains of {a} after removing {b}?", "-"),
    ("Please subtract {b} from {a}.", "-"), ("{a} take away {b}?", "-"),
]
MULTIPLY_CORES = [
    "Use the calculator: what is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?",
    "What is {a} × {b}?", "Compute {a} * {b}.", "What's the product of {a} and {b}?",
    "Calculate {a} multiplied by {b}.", "How much is {a} times {b}?", "{a} * {b} = ?", "{a} x {b}?",
    "Work out {a} times {b} with the calculator.", "I need {a} multiplied by {b}.",
    "A crate holds {b} bottles. How many bottles are in {a} crates?",
    "Each of {a} boxes has {b} items. How many items in all?", "Find the product of {a} and {b}.",
    "Tell me what {a} times {b} is.", "What is {a} multiplied by {b}?", "Evaluate {a}*{b}.",
    "Times {a} by {b}.", "What do you get if you multiply {a} by {b}?", "{a} groups of {b}: how many in total?",
    "Each seat costs {b} dollars. How much do {a} seats cost?", "Calculate the product of {a} and {b}.",
    "Please multiply {a} and {b}.", "How many is {a} lots of {b}?", "{a} by {b} is what?",
    "A field has {a} rows of {b} trees. How many trees are there?", "I have {a} packs of {b} cards. How many cards?",
    "Multiply these: {a} and {b}.", "What's {a} multiplied with {b}?", "Give me {a} * {b}.", "Product of {a} and {b}?",
]


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 3)              # up to 3-digit numbers, sizes mixed
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _spoken(rng: random.Random, n: int) -> str:
    """Small numbers are sometimes written as words, as people type them."""
    return SMALL[n] if n < len(SMALL) and rng.random() < 0.3 else str(n)


def calculator_answer(expression: str, value: int) -> list[dict]:
    """Gold: a calculator call, its result, then the answer in a sentence."""
    return tool_answer("calculator", {"expression": expression}, str(value), f"The answer is {value}.")


class AddSub(Task):
    name = "addsub"

    def operands(self, rng, split) -> tuple[int, str, int]:
        while True:   # the (a, op, b) triple itself is on one side: eval sums never appear in training
            a, b, op = _number(rng), _number(rng), rng.choice("+-")
            if side((a, op, b), "addsub") == split:
                return a, op, b

    def make(self, rng, split):
        a, op, b = self.operands(rng, split)
        template = rng.choice([t for t, ops in split_pool(ADDSUB_CORES, split, "addsub") if op in ops])
        core = template.format(a=_spoken(rng, a), b=_spoken(rng, b), op=op, opw="plus" if op == "+" else "minus")
        value = a + b if op == "+" else a - b
        return user(compose(rng, split, core)), value, calculator_answer(f"{a}{op}{b}", value)

    def verify(self, item: Item, response) -> float:
        return float(last_int(answer_text(response)) == item.reference)


CALC_EXPR = re.compile(r"^\s*(\d+)\s*[*x×]\s*(\d+)\s*$")


def _calculator_calls(response) -> list[dict]:
    calls = []
    for m in response:
        for c in m.get("tool_calls") or []:
            fn = c.get("function", {})
            if fn.get("name") != "calculator":
                continue
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except json.JSONDecodeError:
                continue
            if isinstance(args, dict):
                calls.append(args)
    return calls


class MultiplyWithTool(Task):
    """The answer must come from a calculator call: the engine runs it and inserts the result."""

    name = "multiply_tool"

    def make(self, rng, split):
        while True:
            a, b = rng.randint(11, 999), rng.randint(11, 99)
            if side((a, b), "multiply") == split:
                break
        core = rng.choice(split_pool(MULTIPLY_CORES, split, "multiply")).format(a=a, b=b)
        return user(compose(rng, split, core)), {"a": a, "b": b, "product": a * b}, \
            calculator_answer(f"{a}*{b}", a * b)

    def verify(self, item: Item, response) -> float:
        a, b = item.reference["a"], item.reference["b"]
        called = False
        for args in _calculator_calls(response):
            match = CALC_EXPR.match(str(args.get("expression", "")))
            if match and {int(match[1]), int(match[2])} == {a, b}:
                called = True
        return float(called and last_int(answer_text(response)) == item.reference["product"])
