"""Extract fields from a sentence into a JSON object.

The held-out items name people and cities from the evaluation side of the pools (a dozen
names). Half the training items use made-up names and places ("Osove", "Ynugi") instead of
the training side's ~40: with only those, a small model learns to write one of the names it has
seen ("Alice" for every person) rather than to copy the one in the sentence, and its held-out
JSON accuracy flipped between 56% and 0% from one SFT run to the next.
"""
from __future__ import annotations

import json
import re

from llmforge.tasks.base import Item, Task, answer_text, say, user
from llmforge.tasks.copying import made_up_name
from llmforge.tasks.phrasing import compose, pick
from llmforge.tasks.words import WORDS

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
    # the name after a word for a person: with only the sentences above (the name first or after a
    # verb) the model copied the word before the name in "My neighbour Julia ..." ("Noeighby")
    ("My {rel} {name} is {age} and lives in {city}.", ("name", "age", "city")),
    ("Our {rel} {name}, {age}, comes from {city}.", ("name", "age", "city")),
    ("I met my {rel} {name} ({age}) in {city}.", ("name", "age", "city")),
    ("Yesterday my {rel} {name} turned {age} in {city}.", ("name", "age", "city")),
    ("Say hi to my {rel} {name}: {age} years old, from {city}.", ("name", "age", "city")),
    ("The {rel} {name} is {age} and works in {city}.", ("name", "city")),
    ("My {rel} {name} moved to {city}.", ("name", "city")),
    ("{name} from {city} is {age} years old.", ("name", "age", "city")),
    ("Meet {name}: {age}, living in {city}.", ("name", "age", "city")),
    ("Everyone in {city} knows {name}, who is {age}.", ("name", "age", "city")),
    ("{name} has lived in {city} since turning {age}.", ("name", "age", "city")),
    ("Name: {name}. Age: {age}. Home: {city}.", ("name", "age", "city")),
    ("{name} ({city}) just turned {age}.", ("name", "age", "city")),
    ("At {age} years old, {name} still lives in {city}.", ("name", "city")),
    ("Our new hire, {name}, is {age} and came from {city}.", ("name", "age", "city")),
    ("{name}, who grew up in {city}, is now {age}.", ("name", "age")),
    ("{name} (from {city}) is {age}.", ("name", "age", "city")),
    ("From {city}: {name}, {age}.", ("name", "age", "city")),
    ("{city} resident {name} is {age} years old.", ("name", "age", "city")),
    ("The winner, {name} of {city}, is {age}.", ("name", "age", "city")),
    ("I'm {name}, I'm {age}, and I live in {city}.", ("name", "age", "city")),
    ("This is {name}. {name} is {age} and lives in {city}.", ("name", "age", "city")),
    ("Born in {city}, {name} is now {age}.", ("name", "age", "city")),
    ("{name} is a {age}-year-old from {city}.", ("name", "age", "city")),
    ("Please welcome {name}, {age}, of {city}!", ("name", "age", "city")),
    ("We hired {name} from {city}; {name} is {age}.", ("name", "age", "city")),
    ("My {rel}, {name}, lives in {city} and is {age}.", ("name", "age", "city")),
    ("A letter came from {name} in {city}, who turns {age} soon.", ("name", "age", "city")),
    ("{age}-year-old {name} moved to {city} last spring.", ("name", "age", "city")),
    ("Contact: {name}, {city}, age {age}.", ("name", "age", "city")),
    ("{name} just bought a flat in {city}. {name} is {age}.", ("name", "age", "city")),
    ("When {name} was {age}, the family moved to {city}.", ("name", "age", "city")),
    ("{name} has been a teacher in {city} since age {age}.", ("name", "city")),
    ("Tickets for {name}: one adult, age {age}, to {city}.", ("name", "age", "city")),
    ("{name} is from {city}.", ("name", "city")),
    ("{name} lives and works in {city}.", ("name", "city")),
    ("In {city} lives my {rel} {name}.", ("name", "city")),
    ("{name} drove to {city} yesterday.", ("name", "city")),
    ("Greetings from {city}, where {name} is staying.", ("name", "city")),
    ("{name} celebrates {age} this week.", ("name", "age")),
    ("My {rel} {name} is {age} now.", ("name", "age")),
    ("{name}, {age}, is our new neighbour.", ("name", "age")),
    ("Today is {name}'s birthday: {age}!", ("name", "age")),
    ("The form says: {name}, {age} years.", ("name", "age")),
    ("{name} is {age} and loves chess.", ("name", "age")),
    ("Everyone says {name} looks younger than {age}.", ("name", "age")),
]
CORES = [
    "Extract {fields} as JSON: {s}", "Turn this into JSON with the keys {fields}: {s}",
    "Give me a JSON object with {fields} from: {s}", "From the sentence \"{s}\", pull out {fields} as JSON.",
    "Return JSON ({fields}) for: {s}", "Read this and output {fields} in JSON. {s}",
    "Convert to a JSON record with {fields}: {s}", "Parse {fields} out of this text as JSON: {s}",
    "{s} Please write that as JSON with {fields}.", "Make a JSON object of {fields} from this: {s}",
    "I need the {fields} from \"{s}\" as a JSON object.", "JSON with {fields}, please: {s}",
    "Write {fields} from this as a JSON object: {s}", "Here is a sentence: {s} Give me its {fields} as JSON.",
    "Please produce JSON with the fields {fields}. Text: {s}", "Could you encode {fields} from \"{s}\" in JSON?",
    "Fill a JSON object with {fields} using: {s}", "Output only JSON with {fields}: {s}",
    "What would \"{s}\" look like as JSON with {fields}?", "Structure this as JSON ({fields}): {s}",
]


MADE_UP_SHARE = 0.5   # training items whose name and city are made up
# Words for a person ("my cousin Ravi"), split between training and evaluation like every pool.
# None is a word the letter tasks use, so none can leak into or from their evaluation.
RELATIONS = [r for r in ["friend", "cousin", "colleague", "boss", "sister", "brother", "aunt", "uncle", "classmate",
                          "landlord", "dentist", "coach", "roommate", "grandmother", "tutor", "mentor", "barber",
                          "plumber"] if r not in WORDS]


def _fields(fields: tuple[str, ...]) -> str:
    return ", ".join(fields[:-1]) + " and " + fields[-1] if len(fields) > 1 else fields[0]


class ExtractJSON(Task):
    name = "extract_json"

    def make(self, rng, split):
        values = {"name": pick(rng, NAMES, split, "names"), "age": rng.randint(18, 90),
                  "city": pick(rng, CITIES, split, "cities")}
        if split == "train" and rng.random() < MADE_UP_SHARE:   # copy, do not recall
            values["name"], values["city"] = made_up_name(rng), made_up_name(rng)
        sentence, fields = pick(rng, SENTENCES, split, "sentences")
        sentence = sentence.replace("{rel}", pick(rng, RELATIONS, split, "relations"))
        core = pick(rng, CORES, split, "extract").format(fields=_fields(fields), s=sentence.format(**values))
        text = compose(rng, split, core)
        # a casual request lower-cases its first letter, which may be the name's: copy it as written
        record = {f: values[f] if str(values[f]) in text else values[f][:1].lower() + values[f][1:] for f in fields}
        return user(text), record, say(json.dumps(record))

    def verify(self, item: Item, response) -> float:
        match = re.search(r"\{.*?\}", answer_text(response), re.S)
        if not match:
            return 0.0
        try:
            obj = json.loads(match[0])
        except json.JSONDecodeError:
            return 0.0
        return float(obj == item.reference)
