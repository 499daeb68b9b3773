"""Extract fields from a sentence into a JSON object."""
from __future__ import annotations

import json
import re

from llmforge.tasks.base import Item, Task, answer_text, say, user
from llmforge.tasks.phrasing import compose, pick

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Hugo", "Irene", "Jack",
         "Karen", "Liam", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor",
         "Aisha", "Bruno", "Chen", "Diego", "Elena", "Fatima", "Gustav", "Hana", "Ivan", "Julia",
         "Kenji", "Lucia", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Ravi", "Sofia", "Tomas",
         "Uma", "Wei", "Yara", "Zoe", "Anna", "Ben", "Clara", "Felix", "Lena", "Marco"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Delhi", "Quito", "Seoul",
          "Madrid", "Dublin", "Nairobi", "Austin", "Vienna", "Lisbon", "Prague", "Boston", "Denver", "Sydney",
          "Toronto", "Athens", "Warsaw", "Bogota", "Manila", "Hanoi", "Lagos", "Dakar", "Zurich", "Munich",
          "Kyoto", "Chicago", "Havana", "Santiago", "Helsinki", "Riga", "Accra", "Perth", "Geneva", "Porto"]
SENTENCES = [
    ("{name} is {age} years old and lives in {city}.", ("name", "age", "city")),
    ("{name}, age {age}, moved to {city}.", ("name", "age", "city")),
    ("In {city} I met {name}, who is {age}.", ("name", "age", "city")),
    ("{name} ({age}) works in {city}.", ("name", "age", "city")),
    ("At {age}, {name} left home for {city}.", ("name", "age", "city")),
    ("My neighbour {name} is {age} and grew up in {city}.", ("name", "age", "city")),
    ("{name} lives in {city}.", ("name", "city")),
    ("{name} was born in {city}.", ("name", "city")),
    ("Last year {name} visited {city}.", ("name", "city")),
    ("{name} turned {age} today.", ("name", "age")),
    ("{name} is {age}.", ("name", "age")),
    ("Happy birthday to {name}, now {age}!", ("name", "age")),
    ("{city} is where {name} studies.", ("name", "city")),
    ("{name} just celebrated turning {age}.", ("name", "age")),
]
CORES = [
    "Extract {fields} as JSON: {s}", "Turn this into JSON with the keys {fields}: {s}",
    "Give me a JSON object with {fields} from: {s}", "From the sentence \"{s}\", pull out {fields} as JSON.",
    "Return JSON ({fields}) for: {s}", "Read this and output {fields} in JSON. {s}",
    "Convert to a JSON record with {fields}: {s}", "Parse {fields} out of this text as JSON: {s}",
    "{s} Please write that as JSON with {fields}.", "Make a JSON object of {fields} from this: {s}",
    "I need the {fields} from \"{s}\" as a JSON object.", "JSON with {fields}, please: {s}",
]


def _fields(fields: tuple[str, ...]) -> str:
    return ", ".join(fields[:-1]) + " and " + fields[-1] if len(fields) > 1 else fields[0]


class ExtractJSON(Task):
    name = "extract_json"

    def make(self, rng, split):
        values = {"name": pick(rng, NAMES, split, "names"), "age": rng.randint(18, 90),
                  "city": pick(rng, CITIES, split, "cities")}
        sentence, fields = pick(rng, SENTENCES, split, "sentences")
        record = {f: values[f] for f in fields}
        core = pick(rng, CORES, split, "extract").format(fields=_fields(fields), s=sentence.format(**values))
        return user(compose(rng, split, core)), record, say(json.dumps(record))

    def verify(self, item: Item, response) -> float:
        match = re.search(r"\{.*?\}", answer_text(response), re.S)
        if not match:
            return 0.0
        try:
            obj = json.loads(match[0])
        except json.JSONDecodeError:
            return 0.0
        return float(obj == item.reference)
