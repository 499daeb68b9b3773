"""Arithmetic: addition/subtraction answered directly, multiplication through the calculator tool."""
from __future__ import annotations

import json
import random
import re

from llmforge.tasks.base import Item, Task, answer_text, last_int, say, user


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 3)              # "up to 3-digit numbers", sizes mixed
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


class AddSub(Task):
    name = "addsub"

    def make(self, rng):
        a, b = _number(rng), _number(rng)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        phrasing = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"])
        return user(phrasing.format(a=a, op=op, b=b)), value, say(str(value))

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

    def make(self, rng):
        a, b = rng.randint(11, 999), rng.randint(11, 99)
        phrasing = rng.choice(["Use the calculator: what is {a} * {b}?", "Multiply {a} by {b} with the calculator.",
                               "What is {a} times {b}? Use a tool."])
        expression = f"{a}*{b}"
        gold = [
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator",
                                                  "arguments": json.dumps({"expression": expression})}}]},
            {"role": "tool", "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)},
        ]
        return user(phrasing.format(a=a, b=b)), {"a": a, "b": b, "product": a * b}, gold

    def verify(self, item: Item, response) -> float:
        a, b = item.reference["a"], item.reference["b"]
        called = False
        for args in _calculator_calls(response):
            match = CALC_EXPR.match(str(args.get("expression", "")))
            if match and {int(match[1]), int(match[2])} == {a, b}:
                called = True
        return float(called and last_int(answer_text(response)) == item.reference["product"])
