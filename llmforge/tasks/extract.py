"""Extract fields from a sentence into a JSON object."""
from __future__ import annotations

import json
import re

from llmforge.tasks.base import Item, Task, answer_text, say, user

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Hugo", "Irene", "Jack",
         "Karen", "Liam", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Delhi", "Quito", "Seoul",
          "Madrid", "Dublin", "Nairobi", "Austin", "Vienna"]
TEMPLATES = [
    ("{name} is {age} years old and lives in {city}.", ("name", "age", "city")),
    ("{name}, age {age}, moved to {city}.", ("name", "age", "city")),
    ("In {city} I met {name}, who is {age}.", ("name", "age", "city")),
    ("{name} lives in {city}.", ("name", "city")),
    ("{name} turned {age} today.", ("name", "age")),
]


class ExtractJSON(Task):
    name = "extract_json"

    def make(self, rng):
        values = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
        sentence, fields = rng.choice(TEMPLATES)
        record = {f: values[f] for f in fields}
        prompt = f"Extract {', '.join(fields)} as JSON: {sentence.format(**values)}"
        return user(prompt), record, say(json.dumps(record))

    def verify(self, item: Item, response) -> float:
        match = re.search(r"\{.*?\}", answer_text(response), re.S)
        if not match:
            return 0.0
        try:
            obj = json.loads(match[0])
        except json.JSONDecodeError:
            return 0.0
        return float(obj == item.reference)
