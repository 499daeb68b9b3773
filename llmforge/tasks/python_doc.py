"""Python knowledge from the corpus itself: which module holds a standard-library function, its
parameters, what it does, and how to call it.

The pretraining corpus is the interpreter's standard library and its pydoc topics
(data/sources.py), so every fact asked here is written in that corpus. The function table is
read with `inspect` from a fixed list of pure-Python stdlib modules: public functions (and the
module-level bound methods of `random`/`secrets`) that have a docstring and a readable
signature, names sorted, only the docstring's first sentence kept, so the table is the same
on any CPython 3.11+ (as far as the modules' own docstrings and signatures are). `os.path` is
read from `posixpath` on every platform.

Four kinds of question, each with its own verifier (reference = the source's own facts). A
model this small cannot hold the standard library in its weights, so three kinds are answered
the way a person at a Python prompt would: look it up with the Python tool (`lookup`), then
answer with what it printed. Held-out functions are ones the model never saw asked about.

    module     "Which module is `dedent` in?"          -> "`dedent` is in the `textwrap` module."
               From memory (a search would import every module). 1 if the right module is
               named and no other module of the table is. Asked only of names that exactly one
               module of the table defines.
    signature  "What arguments does textwrap.dedent take?"
               -> python: import inspect, textwrap / print(inspect.signature(textwrap.dedent))
               -> "(text)" -> "textwrap.dedent(text)"
               1 if the first parenthesised parameter list in the answer (after the function's
               name, if it is there) has exactly the source's parameter names, in order.
               Defaults and whitespace are not graded. Asked of functions whose printed
               signature is short and has no object addresses in it.
    doc        "What does textwrap.dedent do?"
               -> python: print(inspect.getdoc(textwrap.dedent).splitlines()[0]) -> that line
               1 if the token F1 against the docstring's first sentence (<= 20 words) is >=
               DOC_F1 (0.5), after normalising: lower case, words only, a short list of stop
               words removed (so "the" and "return" earn nothing). An exact copy scores 1;
               another function's sentence almost never does (tests/test_python_doc.py).
    usage      "How do I call textwrap.dedent?"        -> the signature looked up as above, then
               "import textwrap\ntextwrap.dedent(text)" (the required arguments only)
               1 if the answer contains a Python call of the function (by its qualified name,
               or its bare name after `from module import name`) whose arguments bind to the
               source's signature (inspect.Signature.bind): required ones present, no unknown
               keyword, not too many positionals.

Held out: functions are split by `split_pool(qualified names, split, salt="python_doc")`; a
training item never names an evaluation function, not even inside another function's
docstring (such train functions are dropped from the train pool). Question templates are
split per kind with `pick`, openers/closers by `compose`.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass

from llmforge.tasks.base import Item, Task, answer_text, python_answer, say, user
from llmforge.tasks.phrasing import compose, pick, quote, split_pool

# Pure-Python standard-library modules read for the table (label as users import it), whose
# import has no side effect beyond defining the module: the Python tool may import them
# in-process to answer a look-up (infer/tools.doc_lookup). Modules deprecated for removal
# (PEP 594) and platform-only ones are left out.
MODULES = """abc ast base64 bz2 calendar code codeop codecs collections compileall concurrent.futures
contextlib copy copyreg dataclasses difflib dis doctest email email.header email.iterators email.utils
enum filecmp fileinput fnmatch functools getopt getpass glob gzip heapq hmac html imaplib importlib
importlib.util inspect ipaddress json linecache logging lzma mimetypes os.path pickletools pkgutil
platform plistlib pprint py_compile quopri random re reprlib runpy secrets shlex shutil smtplib socket
statistics string subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit
tokenize tomllib traceback types typing unittest.mock urllib.parse urllib.request uuid warnings
wsgiref.util xml.dom.minidom xml.etree.ElementTree xml.sax.saxutils zipapp zipfile zoneinfo""".split()
IMPORT_AS = {"os.path": "posixpath"}    # read os.path from posixpath everywhere: same table on any OS

MAX_PARAMS = 6          # longer signatures make answers too long for a ~48-token greedy reply
MAX_SIGNATURE_CHARS = 72
MAX_DOC_WORDS = 20
DOC_F1 = 0.5            # doc answers: reward 1 when token F1 >= this
STOP_WORDS = frozenset("""a an the of to and or in on at is are be it its this that as by for with from
if into return returns given object""".split())
KINDS = ("module", "signature", "doc", "usage")


@dataclass(frozen=True)
class Function:
    module: str             # as imported: "os.path", "textwrap"
    name: str               # "dedent"
    params: tuple           # ((name, kind, has_default), ...), kind = inspect.Parameter kind value
    signature: str          # "textwrap.dedent(text)"; simple defaults kept, others shown as ...
    doc: str                # first sentence of the docstring, <= MAX_DOC_WORDS words

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


# ------------------------------------------------------------------ the table

_ABBREV = re.compile(r"(?:\be\.g|\bi\.e|\betc|\bvs|\bcf)\.$", re.IGNORECASE)


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed, cut to
    MAX_DOC_WORDS words ("..." marks a cut)."""
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    end = len(para)
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        if not _ABBREV.search(para[:m.end()]):
            end = m.end()
            break
    words = para[:end].split()
    if len(words) > MAX_DOC_WORDS:
        return " ".join(words[:MAX_DOC_WORDS]).rstrip(",;:") + " ..."
    return " ".join(words)


def _default_text(value) -> str:
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and value == value):
        return repr(value)
    if isinstance(value, str) and len(value) <= 10 and value.isprintable():
        return repr(value)
    return "..."                        # objects, sentinels, platform values: not graded anyway


def render_signature(qualname: str, sig: inspect.Signature) -> str:
    parts, saw_star, P = [], False, inspect.Parameter
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind == P.KEYWORD_ONLY and not saw_star:
            parts.append("*")
            saw_star = True
        if p.kind == P.VAR_POSITIONAL:
            saw_star = True
            parts.append("*" + p.name)
        elif p.kind == P.VAR_KEYWORD:
            parts.append("**" + p.name)
        else:
            parts.append(p.name if p.default is P.empty else f"{p.name}={_default_text(p.default)}")
        if p.kind == P.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind != P.POSITIONAL_ONLY):
            parts.append("/")
    return f"{qualname}({', '.join(parts)})"


def _routines(module: str):
    """(name, routine) pairs a module exports, in sorted name order."""
    try:
        mod = importlib.import_module(IMPORT_AS.get(module, module))
    except ImportError:                  # a build without bz2/lzma, say: that module is just absent
        return
    exported = getattr(mod, "__all__", None)
    for name in sorted(exported if exported is not None else vars(mod)):
        obj = getattr(mod, name, None)
        if name.startswith("_") or obj is None:
            continue
        if inspect.isfunction(obj):
            if exported is None and obj.__module__ != mod.__name__:
                continue                 # imported from elsewhere, not this module's own
        elif not (inspect.ismethod(obj) and not inspect.isclass(obj.__self__)
                  and inspect.isfunction(obj.__func__)):   # random.randint: a bound method
            continue
        yield name, obj


@functools.lru_cache(maxsize=1)
def functions() -> tuple[Function, ...]:
    """Every usable function of MODULES, in (module, name) order; built once, in well under a second."""
    table, seen = [], set()
    for module in sorted(MODULES):
        for name, obj in _routines(module):
            code = getattr(inspect.unwrap(obj), "__code__", None) or obj
            doc = obj.__doc__
            if code in seen or not doc or "deprecated" in doc.lower():
                continue
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            sentence = first_sentence(doc)
            if (len(sig.parameters) > MAX_PARAMS or sentence.startswith(name + "(")
                    or len(_content_tokens(sentence)) < 3):
                continue
            qualname = f"{module}.{name}"
            signature = render_signature(qualname, sig)
            if len(signature) > MAX_SIGNATURE_CHARS:
                continue
            seen.add(code)
            params = tuple((p.name, int(p.kind), p.default is not inspect.Parameter.empty)
                           for p in sig.parameters.values())
            table.append(Function(module, name, params, signature, sentence))
    return tuple(table)


def mentions(text: str, qualname: str) -> bool:
    """Whether `text` names `qualname` as a whole dotted name (shutil.copy is not in shutil.copy2)."""
    return re.search(rf"(?<![\w.]){re.escape(qualname)}(?!\w)", text) is not None


@functools.lru_cache(maxsize=4)
def pool(split: str) -> tuple[Function, ...]:
    """`split`'s functions. Train drops any function whose text names an eval function."""
    table = {f.qualname: f for f in functions()}
    mine = [table[q] for q in split_pool(sorted(table), split, salt="python_doc")]
    if split == "train":
        held = split_pool(sorted(table), "eval", salt="python_doc")
        mine = [f for f in mine if not any(mentions(f.signature + " " + f.doc, q) for q in held)]
    return tuple(mine)


@functools.lru_cache(maxsize=1)
def _unique_names() -> frozenset:
    counts: dict[str, int] = {}
    for f in functions():
        counts[f.name] = counts.get(f.name, 0) + 1
    return frozenset(n for n, c in counts.items() if c == 1)


# ------------------------------------------------------------------ questions

CORES = {
    "module": [
        "Which module is {n} in?", "Which standard-library module defines {n}?",
        "What module do I import to use {n}?", "Where does the function {n} live in Python's standard library?",
        "In which module can I find {n}?", "{n} is a function in which Python module?",
        "Name the module that provides {n}.", "What do I need to import to get {n}?",
        "Which stdlib module has a function called {n}?", "Tell me which module {n} belongs to.",
        "I want to call {n}. Which module is it from?", "{n}: which module?",
        "Which Python module contains the function {n}?", "What's the module for {n}?",
        "Which module should I import for {n}?", "Where is {n} defined?", "{n} comes from which module?",
        "Which library module has {n}?", "Who provides {n} in the standard library?", "Module of {n}?",
        "What's the import for {n}?", "Which part of the stdlib is {n} in?", "Where can I import {n} from?",
        "Which module do I need for {n}?",
    ],
    "signature": [
        "What arguments does {f} take?", "What is the signature of {f}?", "What parameters does {f} accept?",
        "Show me the signature of {f}.", "List the parameters of {f}.", "What are the arguments of {f}?",
        "Write the call signature of {f}.", "Which arguments can I pass to {f}?",
        "What does the parameter list of {f} look like?", "Give me the parameters of {f}, in order.",
        "{f} takes which arguments?", "What are the parameter names of {f}?",
        "Signature of {f}?", "Remind me of the arguments {f} expects.",
        "What goes in the parentheses when calling {f}?", "Arguments of {f}?", "How many parameters does {f} have, and what are they?",
        "What inputs does {f} take?", "Parameters of {f}, please.", "Spell out the signature of {f}.",
        "What can I pass into {f}?", "Which parameters does {f} define?", "Print the signature of {f}.",
        "Tell me the arguments of {f}.",
    ],
    "doc": [
        "What does {f} do?", "Explain {f} in one sentence.", "What is {f} for?", "Describe what {f} does.",
        "Briefly, what does {f} do?", "What's the purpose of {f}?", "Summarise the docstring of {f}.",
        "Tell me what {f} does.", "In a sentence, what does {f} do?", "What is the job of the function {f}?",
        "Give me a one-line description of {f}.", "I found {f} in some code. What does it do?",
        "What does the docstring of {f} say?", "Explain the function {f}.",
        "What is {f} used for?", "Can you explain what {f} does?", "Describe {f} briefly.",
        "What does calling {f} do?", "Summarise {f} for me.", "What's {f} good for?", "Tell me about {f}.",
        "What does the function {f} do, in short?", "Quick summary of {f}?", "I don't know {f}. What does it do?",
    ],
    "usage": [
        "How do I call {f}?", "Show me how to use {f}.", "Give me a short example that calls {f}.",
        "Write a line of code that calls {f}.", "How would I use {f} in my code?",
        "Can you show an example call of {f}?", "What's the usage of {f}?", "Show a minimal call to {f}.",
        "Example of {f}, please.", "Write a snippet using {f}.", "How is {f} called?", "Demonstrate {f}.",
        "Show me code that uses {f}.", "I need to use {f}. What does the call look like?",
        "Give me an example of calling {f}.", "How do I use {f}?", "Write a call to {f}.",
        "Show a typical call of {f}.", "What does a call to {f} look like?", "Code example for {f}?",
        "How would I invoke {f}?", "Sample usage of {f}, please.", "Call {f} in one line of code.",
        "Show me {f} in action.",
    ],
}


def usage_line(f: Function) -> str:
    """`import module` then a call with the required arguments, named after the parameters."""
    P, args = inspect.Parameter, []
    for name, kind, has_default in f.params:
        if has_default or kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            continue
        args.append(f"{name}={name}" if kind == P.KEYWORD_ONLY else name)
    return f"import {f.module}\n{f.qualname}({', '.join(args)})"


def _object(f: Function):
    return getattr(importlib.import_module(IMPORT_AS.get(f.module, f.module)), f.name)


def lookup(kind: str, f: Function) -> tuple[str, str] | None:
    """(code, what it prints): the Python tool call that reads the answer from the interpreter
    itself, for the kinds it can (signature, doc, usage); None for "module", which would mean
    importing every module to search them."""
    imports = "inspect" if f.module == "inspect" else f"inspect, {f.module}"
    if kind in ("signature", "usage"):
        return (f"# {kind}\nimport {imports}\nprint(inspect.signature({f.qualname}))",
                f"{inspect.signature(_object(f))}\n")
    if kind == "doc":
        return (f"# doc\nimport {imports}\nprint(inspect.getdoc({f.qualname}).splitlines()[0])",
                f"{inspect.getdoc(_object(f)).splitlines()[0]}\n")
    return None


@functools.lru_cache(maxsize=1)
def _plainly_printed() -> frozenset:
    """Qualified names whose printed signature is short and the same in every process (no
    object reprs with addresses): the ones signature and usage questions are asked about."""
    return frozenset(f.qualname for f in functions()
                     if len(printed := str(inspect.signature(_object(f)))) <= MAX_SIGNATURE_CHARS
                     and " at 0x" not in printed)


def gold_answer(kind: str, f: Function) -> list[dict]:
    """Module questions are answered from memory; the others look the answer up with the
    Python tool and answer with what it printed (a usage line keeps the required arguments)."""
    if kind == "module":
        return say(f"`{f.name}` is in the `{f.module}` module.")
    code, printed = lookup(kind, f)
    final = {"signature": f"{f.qualname}{printed.strip()}", "doc": printed.strip(), "usage": usage_line(f)}[kind]
    return python_answer(code, printed, final)


class PythonDoc(Task):
    name = "python_doc"
    max_new_tokens = 96     # a looked-up answer: the tool code, then what it printed (up to ~92 tokens)

    def make(self, rng: random.Random, split: str):
        kind = rng.choice(KINDS)
        candidates = pool(split)
        if kind == "module":
            candidates = [f for f in candidates if f.name in _unique_names()]
        elif kind in ("signature", "usage"):
            candidates = [f for f in candidates if f.qualname in _plainly_printed()]
        f = rng.choice(candidates)
        template = pick(rng, CORES[kind], split, salt=f"python_doc:{kind}")
        core = template.format(n=quote(rng, f.name), f=quote(rng, f.qualname))
        reference = {"kind": kind, "module": f.module, "name": f.name, "params": [list(p) for p in f.params],
                     "doc": f.doc}
        return user(compose(rng, split, core)), reference, gold_answer(kind, f)

    def verify(self, item: Item, response) -> float:
        ref, text = item.reference, answer_text(response)
        check = {"module": module_ok, "signature": signature_ok, "doc": doc_ok, "usage": usage_ok}[ref["kind"]]
        return float(check(ref, text))


# ------------------------------------------------------------------ verifiers

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


@functools.lru_cache(maxsize=1)
def _table_modules() -> frozenset:
    return frozenset(m.lower() for m in MODULES)


def _module_of(token: str):
    """The longest module prefix of a dotted token ('os.path.join' -> 'os.path'), or None."""
    parts = token.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in _table_modules():
            return ".".join(parts[:k])
    return None


def module_ok(ref: dict, text: str) -> bool:
    name, module, tokens = ref["name"].lower(), ref["module"].lower(), _DOTTED.findall(text.lower())
    if name in tokens:                  # the function itself is not a module named ("glob" in glob:
        tokens.remove(name)             # its first mention is the function, a second the module)
    if name != module:
        tokens = [t for t in tokens if t != name]
    named = {_module_of(t) for t in tokens}
    named.discard(None)
    return named == {module}


def _param_list(ref: dict, text: str):
    """The text inside the parentheses after the function's name (or the first ones)."""
    m = re.search(rf"(?<!\w){re.escape(ref['name'])}\s*\(", text) or re.search(r"\(", text)
    if not m:
        return None
    depth, start = 1, m.end()
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def signature_ok(ref: dict, text: str) -> bool:
    inside = _param_list(ref, text)
    if inside is None:
        return False
    try:
        with warnings.catch_warnings():   # model-written text: warnings are noise, errors are handled
            warnings.simplefilter("ignore", SyntaxWarning)
            a = ast.parse(f"def _f({inside}): pass").body[0].args
        names = [x.arg for x in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else []) + \
                [x.arg for x in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
    except (SyntaxError, ValueError):
        pieces = [p.strip().lstrip("*").strip() for p in inside.split(",")]
        names = [re.match(r"\w*", p).group() for p in pieces if p not in ("", "/")]
    return names == [p[0] for p in ref["params"]]


def _content_tokens(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS]


def doc_f1(reference: str, answer: str) -> float:
    """Token F1 (SQuAD-style, on content words) between an answer and the reference sentence."""
    ref, got = _content_tokens(reference), _content_tokens(answer)
    if not ref or not got:
        return 0.0
    common = sum(min(ref.count(w), got.count(w)) for w in set(got))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def doc_ok(ref: dict, text: str) -> bool:
    return doc_f1(ref["doc"], text) >= DOC_F1


def _calls(text: str, callee: str):
    """Every `callee(...)` written in the text, parsed as a Python call (None where it does not parse)."""
    for m in re.finditer(rf"(?<![\w.]){re.escape(callee)}\s*\(", text):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", SyntaxWarning)
                        yield ast.parse(text[m.start():i + 1], mode="eval").body
                except SyntaxError:
                    yield None
                break


def usage_ok(ref: dict, text: str) -> bool:
    P = inspect.Parameter
    sig = inspect.Signature([P(name, kind, default=0 if has_default else P.empty)
                             for name, kind, has_default in ref["params"]])
    module, name = ref["module"], ref["name"]
    callees = [f"{module}.{name}"]
    if re.search(rf"\bfrom\s+{re.escape(module)}\s+import\s+[\w\s,(]*\b{name}\b(?!\s+as\b)", text):
        callees.append(name)             # `from textwrap import indent` then indent(...)
    for callee in callees:
        for call in _calls(text, callee):
            if not isinstance(call, ast.Call):
                continue
            if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                continue                  # *xs / **kw: arity unknown, not credited
            try:
                sig.bind(*range(len(call.args)), **{k.arg: 0 for k in call.keywords})
                return True
            except TypeError:
                continue
    return False
