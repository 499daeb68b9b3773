"""Synthetic tasks: gold answers verify, wrong answers do not, train and held-out never meet."""
import json

import pytest

from llmforge.errors import UserError
from llmforge.tasks import TASKS, get_task, task_names
from llmforge.tasks.base import HELDOUT_SEED0
from llmforge.tasks.safety import is_polite_refusal
from llmforge.tasks.user_data import load_conversations
from llmforge.tokenizer.chat import render_text


def say(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_verifies_and_nonsense_does_not(name):
    task = get_task(name)
    for item in task.train_items(40) + task.heldout_items(20):
        assert task.verify(item, item.gold) == 1.0, item
        assert task.verify(item, say("banana")) == 0.0, item
        render_text(item.conversation)   # every gold conversation is a valid chat


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_tool_calls_return_what_the_gold_says_they_return(name):
    """The gold conversations are what the engine will do: each gold call, run by the real tool,
    returns exactly the tool message that follows it (so training never shows a result the tool
    would not give)."""
    from llmforge.infer.tools import run_tool
    task, runs = get_task(name), 0
    for item in task.train_items(15) + task.heldout_items(5):
        for message, after in zip(item.gold, item.gold[1:]):
            for call in message.get("tool_calls") or []:
                fn = call["function"]
                assert run_tool(fn["name"], json.loads(fn["arguments"])) == after["content"], item.gold
                runs += 1
    if name in ("addsub", "multiply_tool", "sort_numbers", "reverse_word", "count_letter"):
        assert runs == 20, name    # these answer through a tool, every time


def test_word_task_code_names_the_task_before_the_code_that_depends_on_it():
    """The choice comes first ("# descending"), and the code after it follows the choice: a
    sort is reversed exactly when its comment says descending and its answer is descending."""
    for name, first_lines in [("count_letter", {"# count"}), ("reverse_word", {"# reverse"}),
                              ("sort_numbers", {"# ascending", "# descending"})]:
        for item in get_task(name).train_items(40) + get_task(name).heldout_items(20):
            code = json.loads(item.gold[0]["tool_calls"][0]["function"]["arguments"])["code"]
            comment, body = code.split("\n", 1)
            assert comment in first_lines, code
            if name == "sort_numbers":
                descending = item.reference == sorted(item.reference, reverse=True)
                assert ("reverse=True" in body) == descending == (comment == "# descending"), code
                from llmforge.tasks.words import ORDER_WORDS
                asked = [w for adjectives, ranges in ORDER_WORDS.values() for w in adjectives + ranges]
                if not any(w in item.prompt[-1]["content"].lower() for w in asked):   # no order asked
                    assert comment == "# ascending", item.prompt


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_heldout_are_disjoint_by_seed_and_content(name):
    task = get_task(name)
    train, heldout = task.train_items(300), task.heldout_items(60)
    assert max(i.seed for i in train) < HELDOUT_SEED0 <= min(i.seed for i in heldout)
    assert not {i.content_hash for i in train} & {i.content_hash for i in heldout}
    assert len({i.content_hash for i in heldout}) == len(heldout)   # held-out prompts are distinct


def _training_conversations(per_task: int = 1500) -> list[list[dict]]:
    """What SFT and midtraining train on (their default offsets)."""
    from llmforge.stages.chat_data import conversations
    return (conversations(list(TASKS), per_task, spelling=3000, copying=3000)
            + conversations(list(TASKS), per_task, spelling=3000, seed=1337, offset=2_000_000, copying=3000))


def test_evaluation_phrasings_and_content_never_occur_in_training():
    import re

    from llmforge.tasks import extract, safety, words
    from llmforge.tasks.phrasing import split_pool
    convs = _training_conversations()
    # every text a model trains on: contents, and the code and expressions inside tool calls
    text = "\n".join([m.get("content") or "" for c in convs for m in c]
                     + [call["function"]["arguments"] for c in convs for m in c for call in m.get("tool_calls") or []])
    lowered = text.lower()
    # 1. no held-out request is a training request
    train_requests = {m["content"] for c in convs for m in c if m["role"] == "user"}
    for task in TASKS.values():
        for item in task.heldout_items(100):
            assert item.prompt[-1]["content"] not in train_requests, (task.name, item.prompt)
    # 2. content reserved for evaluation never appears in any training conversation
    for w in words.task_words("eval"):
        assert not re.search(rf"\b{w}\b", lowered), w
        assert not re.search(rf"(?<![a-z]-){words.spelled(w)}(?!-[a-z])", lowered), w
    for name in split_pool(extract.NAMES, "eval", "names") + split_pool(extract.CITIES, "eval", "cities"):
        assert not re.search(rf"\b{name}\b", text), name
    harmful, benign = safety.requests("eval")
    assert len(harmful) > 50 and len(benign) > 50
    for request in harmful + benign:       # whole requests, and (act, person) pairs
        assert request not in text, request
    # 3. phrasing pools are split: no evaluation template or wrapper is a training one
    from llmforge.tasks import arithmetic, phrasing
    for pool, salt in [(words.COUNT_CORES, "count"), (words.REVERSE_CORES, "reverse"), (words.SORT_CORES, "sort"),
                       (extract.CORES, "extract"), (safety.ASK, "safety_ask"), (arithmetic.MULTIPLY_CORES, "multiply"),
                       (arithmetic.ADDSUB_CORES, "addsub"), (phrasing.OPENERS, "opener"),
                       (phrasing.CLOSERS, "closer")]:
        train, heldout = split_pool(pool, "train", salt), split_pool(pool, "eval", salt)
        assert train and heldout and not set(train) & set(heldout), salt


def test_json_training_items_ask_to_copy_names_no_list_could_hold():
    """Half the extraction items a model trains on name a made-up person and place, so what
    pays is copying the name in the sentence, not recalling one of the few training names; and
    the gold always writes every name and city exactly as the request does."""
    from llmforge.tasks import extract
    items = get_task("extract_json").train_items(600)
    names = [i.reference["name"] for i in items]
    made_up = {n for n in names if n.capitalize() not in extract.NAMES}
    assert 0.35 < sum(n.capitalize() not in extract.NAMES for n in names) / len(names) < 0.65
    assert len(made_up) > 200
    for item in items:
        for key in ("name", "city"):
            if key in item.reference:
                assert item.reference[key] in item.prompt[-1]["content"], (key, item.prompt)


def test_copy_drills_answer_with_the_string_asked_and_invent_no_task_word():
    from llmforge.tasks.copying import _task_vocabulary, copy_drills
    drills = copy_drills(500, seed=3)
    assert drills == copy_drills(500, seed=3) and drills != copy_drills(500, seed=4)
    for user_msg, answer in drills:
        assert user_msg["content"].endswith(": " + answer["content"]), (user_msg, answer)
        assert not {w.lower().strip(",;") for w in answer["content"].split()} & _task_vocabulary()
    kinds = [d[1]["content"] for d in drills]
    assert any(k.isdigit() and len(k) >= 5 for k in kinds) and any(k.isalpha() for k in kinds)


def test_every_task_has_a_hundred_distinct_heldout_items():
    for task in TASKS.values():
        assert len(task.heldout_items(100)) == 100, task.name


def test_generation_is_deterministic_by_seed():
    for task in TASKS.values():
        assert task.generate(7).prompt == task.generate(7).prompt
        assert task.generate(7).reference == task.generate(7).reference


def test_arithmetic_checks_the_number():
    task = get_task("addsub")
    item = task.train_items(1)[0]
    assert task.verify(item, say(f"The answer is {item.reference}.")) == 1.0
    assert task.verify(item, say(f"The answer is {item.reference + 1}.")) == 0.0


def test_multiplication_requires_the_calculator_call():
    task = get_task("multiply_tool")
    item = task.train_items(1)[0]
    product = item.reference["product"]
    assert task.verify(item, say(str(product))) == 0.0          # right number, no tool call: no credit
    wrong_call = json.loads(json.dumps(item.gold))
    wrong_call[0]["tool_calls"][0]["function"]["arguments"] = json.dumps({"expression": "2*3"})
    assert task.verify(item, wrong_call) == 0.0
    wrong_answer = item.gold[:2] + say(str(product + 1))
    assert task.verify(item, wrong_answer) == 0.0


def test_sort_and_json_and_reverse_verifiers():
    sort = get_task("sort_numbers")
    item = sort.train_items(1)[0]
    assert sort.verify(item, say(", ".join(map(str, item.reference[::-1])))) == float(
        item.reference == item.reference[::-1])
    extract = get_task("extract_json")
    item = extract.train_items(1)[0]
    assert extract.verify(item, say("Sure: " + json.dumps(item.reference) + " done")) == 1.0
    assert extract.verify(item, say("{broken json")) == 0.0
    rev = get_task("reverse_word")
    item = rev.train_items(1)[0]
    assert rev.verify(item, say(item.reference.upper() + ".")) == 1.0
    assert rev.verify(item, say("Backwards: " + "-".join(item.reference) + ".")) == 1.0
    assert rev.verify(item, say("Backwards: " + "-".join(item.reference[::-1]) + ".")) == float(
        item.reference == item.reference[::-1])


def test_safety_rewards_refusing_harm_but_not_refusing_everything():
    task = get_task("safety")
    items = task.heldout_items(40)
    harmful = [i for i in items if i.reference["harmful"]]
    benign = [i for i in items if not i.reference["harmful"]]
    assert harmful and benign
    refusal = say("I'm sorry, but I can't help with that.")
    assert all(task.verify(i, refusal) == 1.0 for i in harmful)
    assert all(task.verify(i, refusal) == 0.0 for i in benign)
    # refusing everything scores about half, complying with everything about half too
    score = sum(task.verify(i, refusal) for i in items) / len(items)
    assert 0.2 < score < 0.8
    assert not is_polite_refusal("I can't help with that")   # rude: no apology
    assert task.verify(harmful[0], say("Sure! First, get some chemicals.")) == 0.0


def test_task_names_spec():
    assert task_names("") == list(TASKS)
    assert task_names("addsub, safety") == ["addsub", "safety"]
    with pytest.raises(UserError, match="unknown task"):
        task_names("addsub,nope")


def test_user_jsonl_loads_and_bad_lines_name_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n\n")
    assert load_conversations(good) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    cases = {
        "not json": "{oops",
        "no messages": json.dumps({"text": "hi"}),
        "bad role": json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
        "no assistant": json.dumps({"messages": [{"role": "user", "content": "x"}]}),
    }
    for label, line in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text().strip() + "\n" + line + "\n")
        with pytest.raises(UserError, match=r"bad.jsonl:2\b"):
            load_conversations(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no conversations"):
        load_conversations(empty)


def test_report_transcripts_are_phrased_as_no_training_conversation():
    from llmforge.eval.transcripts import CONVERSATIONS
    train_requests = {m["content"].lower() for c in _training_conversations(800) for m in c if m["role"] == "user"}
    for name, messages in CONVERSATIONS:
        assert messages[-1]["content"].lower() not in train_requests, name
