"""python_doc: stdlib facts read from the corpus, held-out functions and templates, honest verifiers."""
import json
import re
import time

import pytest

from llmforge.tasks import python_doc as pd
from llmforge.tasks.base import HELDOUT_SEED0, Item
from llmforge.tasks.phrasing import OPENERS, split_pool
from llmforge.tokenizer.chat import render_text

TASK = pd.PythonDoc()


def say(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def train():
    return TASK.train_items(3000)


@pytest.fixture(scope="module")
def heldout():
    return TASK.heldout_items(400)


def by_kind(items):
    out = {k: [] for k in pd.KINDS}
    for item in items:
        out[item.reference["kind"]].append(item)
    return out


def test_table_is_cheap_sorted_and_big_enough():
    start = time.perf_counter()
    fresh = pd.functions.__wrapped__()          # rebuilt, not the cached copy
    assert time.perf_counter() - start < 2.0
    assert fresh == pd.functions()              # deterministic
    keys = [(f.module, f.name) for f in fresh]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(fresh) >= 400
    assert len(pd.pool("eval")) >= 100 and len(pd.pool("train")) >= 300
    dedent = next(f for f in fresh if f.qualname == "textwrap.dedent")
    assert dedent.signature == "textwrap.dedent(text)"
    assert dedent.doc.startswith("Remove any common leading whitespace")
    join = next(f for f in fresh if f.qualname == "os.path.join")      # read from posixpath everywhere
    assert [p[0] for p in join.params] == ["a", "p"]
    for f in fresh:
        assert len(f.doc.split()) <= pd.MAX_DOC_WORDS + 1 and len(f.signature) <= pd.MAX_SIGNATURE_CHARS


def test_generation_is_deterministic():
    for seed in (0, 7, HELDOUT_SEED0 + 3):
        for split in ("train", "eval"):
            a, b = TASK.generate(seed, split), TASK.generate(seed, split)
            assert (a.prompt, a.reference, a.gold) == (b.prompt, b.reference, b.gold)


def test_every_kind_appears_and_gold_is_short(train, heldout):
    for items in (train, heldout):
        kinds = by_kind(items)
        assert all(len(kinds[k]) > len(items) // 8 for k in pd.KINDS)
    for item in train + heldout:
        json.dumps(item.reference)
        render_text(item.conversation)
        assert len(item.gold[-1]["content"]) <= 160


def test_heldout_functions_never_appear_in_training(train, heldout):
    eval_fns, train_fns = set(f.qualname for f in pd.pool("eval")), set(f.qualname for f in pd.pool("train"))
    assert not eval_fns & train_fns
    seen_train = {f"{i.reference['module']}.{i.reference['name']}" for i in train}
    seen_eval = {f"{i.reference['module']}.{i.reference['name']}" for i in heldout}
    assert seen_train <= train_fns and seen_eval <= eval_fns
    assert len(seen_eval) >= 100 and len(seen_train) >= 300
    texts = [m["content"] for i in train for m in i.prompt + i.gold] + \
        [c["function"]["arguments"] for i in train for m in i.gold for c in m.get("tool_calls") or []]
    blob = "\n".join(texts)
    leaked = [q for q in eval_fns if pd.mentions(blob, q)]
    assert not leaked
    # module questions name only the bare function: no eval bare name is asked about in training
    train_module_names = {i.reference["name"] for i in by_kind(train)["module"]}
    assert not train_module_names & {i.reference["name"] for i in by_kind(heldout)["module"]}


def _template_regex(template):
    """A filled template inside a composed prompt (compose may lower-case it or drop its final mark)."""
    pieces = re.split(r"\{[nf]\}", template.rstrip(".?!"))
    return re.compile(r"\S+".join(re.escape(p) for p in pieces), re.IGNORECASE)


def test_templates_are_split_and_heldout_wording_is_unseen(train, heldout):
    for kind, cores in pd.CORES.items():
        assert len(cores) >= 8
        tr, ev = (split_pool(cores, s, salt=f"python_doc:{kind}") for s in ("train", "eval"))
        assert not set(tr) & set(ev) and len(tr) >= 4 and len(ev) >= 2
        eval_res = [_template_regex(t) for t in ev]
        train_res = [_template_regex(t) for t in tr]
        for item in by_kind(train)[kind]:
            cores = _cores(item.prompt[0]["content"])
            assert not any(r.match(c) for r in eval_res for c in cores), cores
            assert any(r.match(c) for r in train_res for c in cores), cores
        for item in by_kind(heldout)[kind]:
            cores = _cores(item.prompt[0]["content"])
            assert any(r.match(c) for r in eval_res for c in cores), cores


def _cores(text):
    """The prompt with and without its opener: where the core template may start."""
    return [text] + [text[len(o) + 1:] for o in OPENERS if text.lower().startswith(o.lower() + " ")]


def test_lookups_print_in_the_real_sandbox_what_the_gold_says(heldout):
    """The gold's tool result is what the Python tool really prints for its code, in-process
    and in the sandbox, so a model that writes the look-up reads the answer it was trained to copy."""
    from llmforge.infer.tools import run_python
    looked_up = [i for i in heldout if i.reference["kind"] != "module"]
    assert {i.reference["kind"] for i in looked_up} == {"signature", "doc", "usage"}
    for item in looked_up[:12]:
        code = json.loads(item.gold[0]["tool_calls"][0]["function"]["arguments"])["code"]
        assert run_python(code) == run_python(code + "\npass") == item.gold[1]["content"], code   # fast path, sandbox


def test_heldout_items_are_many_and_distinct():
    items = TASK.heldout_items(150)
    assert len(items) == 150 and len({i.content_hash for i in items}) == 150


def test_gold_verifies_and_nonsense_does_not(train, heldout):
    for item in train[:600] + heldout:
        assert TASK.verify(item, item.gold) == 1.0, item
        assert TASK.verify(item, say("banana")) == 0.0, item
        assert TASK.verify(item, say("")) == 0.0, item


def test_another_functions_answer_scores_near_zero(heldout):
    """The reward is about this function: the gold of the next item of the same kind fails."""
    for kind, items in by_kind(heldout).items():
        shifted = items[1:] + items[:1]
        wrong = [TASK.verify(i, j.gold) for i, j in zip(items, shifted)
                 if j.reference["module"] != i.reference["module"] or kind != "module"]
        assert sum(wrong) <= 0.06 * len(wrong), kind


def _item(kind, qualname):
    f = next(f for f in pd.functions() if f.qualname == qualname)
    reference = {"kind": kind, "module": f.module, "name": f.name, "params": [list(p) for p in f.params],
                 "doc": f.doc}
    return Item("python_doc", 0, [], reference, pd.gold_answer(kind, f))


def test_module_verifier():
    item = _item("module", "textwrap.dedent")
    assert TASK.verify(item, say("It's in textwrap.")) == 1.0
    assert TASK.verify(item, say("Use `from textwrap import dedent`.")) == 1.0
    assert TASK.verify(item, say("textwrap.dedent")) == 1.0
    assert TASK.verify(item, say("`dedent` is in the `string` module.")) == 0.0
    assert TASK.verify(item, say("Either textwrap or string.")) == 0.0      # hedging is not credited
    path = _item("module", "os.path.basename")
    assert TASK.verify(path, say("`basename` is in the `os.path` module.")) == 1.0
    assert TASK.verify(path, say("`basename` is in the `shutil` module.")) == 0.0
    same = _item("module", "fnmatch.fnmatch")                                 # name == module
    assert TASK.verify(same, say("`fnmatch` is in the `fnmatch` module.")) == 1.0
    assert TASK.verify(same, say("`fnmatch` is in the `glob` module.")) == 0.0
    assert TASK.verify(same, say("`fnmatch` is in the `pathlib` module.")) == 0.0    # not in the table


def test_signature_verifier():
    item = _item("signature", "textwrap.indent")
    assert item.gold[-1]["content"] == "textwrap.indent(text, prefix, predicate=None)"
    assert TASK.verify(item, say("indent( text,prefix , predicate )")) == 1.0    # defaults, spaces free
    assert TASK.verify(item, say("It is textwrap.indent(text, prefix, predicate=...).")) == 1.0
    assert TASK.verify(item, say("textwrap.indent(text, prefix)")) == 0.0       # a parameter missing
    assert TASK.verify(item, say("textwrap.indent(prefix, text, predicate=None)")) == 0.0   # order
    assert TASK.verify(item, say("textwrap.indent(text, prefix, predicate, width)")) == 0.0  # extra
    assert TASK.verify(item, say("text, prefix, predicate")) == 0.0             # no parameter list


def test_doc_verifier_uses_content_word_f1():
    item = _item("doc", "textwrap.dedent")
    sentence = item.reference["doc"]
    assert pd.doc_f1(sentence, sentence) == 1.0
    assert TASK.verify(item, say(sentence.upper().rstrip("."))) == 1.0          # normalised exact match
    assert TASK.verify(item, say("It removes common leading whitespace from every line.")) == 1.0
    assert TASK.verify(item, say("Return the text.")) == 0.0                   # stop words earn nothing
    assert TASK.verify(item, say(sentence + " " + "lorem ipsum dolor sit amet " * 6)) == 0.0   # padding
    assert pd.doc_f1("Return the logger", "return the") == 0.0


def test_usage_verifier_binds_the_call_to_the_signature():
    item = _item("usage", "textwrap.indent")
    assert item.gold[-1]["content"] == "import textwrap\ntextwrap.indent(text, prefix)"
    assert TASK.verify(item, say("```python\nfrom textwrap import indent\nprint(indent(s, '> '))\n```")) == 1.0
    assert TASK.verify(item, say("Like this: textwrap.indent(s, prefix='  ', predicate=None)")) == 1.0
    assert TASK.verify(item, say("textwrap.indent(s)")) == 0.0                   # required argument missing
    assert TASK.verify(item, say("textwrap.indent(a, b, c, d)")) == 0.0          # too many
    assert TASK.verify(item, say("textwrap.indent(s, p, width=3)")) == 0.0       # no such keyword
    assert TASK.verify(item, say("indent(s, p)")) == 0.0                         # bare name, never imported
    assert TASK.verify(item, say("textwrap.dedent(s)")) == 0.0                   # another function
