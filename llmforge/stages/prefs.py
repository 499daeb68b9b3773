"""Preference pairs: JSONL records {prompt, chosen, rejected, margin?, source, detail?, ...}.

    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}], "margin": 1.0, "source": "verifier"}

`prompt` is a list of messages (or a plain string = one user message); `chosen` and `rejected`
are the assistant-side messages that follow it (or plain strings = one assistant message).
`"rejected_ended": false` marks a rejected response that never ended (it is scored without its
closing <|end|>, exactly as RL scores a sample cut off at max_new_tokens).

A reward model can only learn what it can see. Deciding "937" vs "936" takes doing the sum, so
pairs that differ only in a number teach it little (measured: 56% on those, ~71% on form);
what it *can* judge is form, helpfulness, refusals and format. So besides the verifier-labelled
pairs, every prompt gets constructed contrasts, written generically from the item's prompt and
gold answer (they work for any task that has Item + verify), each tagged with its `source`:

  form         a well-formed answer vs the same content badly formed: rambling, filler with no
               answer, echoing the question, a broken or spurious tool call, a missing tool call,
               truncated, never-ending, JSON with broken syntax; plus the policy's own samples
               that verify but are badly formed (e.g. never ended)
  helpfulness  answering vs an evasive non-answer ("I don't know", asking back for no reason),
               or vs refusing a harmless request
  refusal      a harmful request: refusal over compliance; a benign request that merely sounds
               risky: the helpful answer over a refusal (Llama 2's helpfulness/safety tension)
  format       the requested format honoured vs not: JSON when JSON is asked (vs the same
               fields in prose), a number when a number is asked (vs the number in words)
  verifier     the SFT model's own samples: a verified-correct one (or the gold answer when none
               is) over a verified-wrong one, and the gold with its number changed; `detail`
               "number_only" marks pairs whose two sides differ only in digits
  user         the user's JSONL in this same format (rm.user_prefs); the serving feedback store
               exports this format too

Every constructed rejected answer is checked to be worse: it fails the task's verifier, or
`form_problems` finds something wrong with it that the chosen answer does not have.
`accuracy_by_group` reports a reward model's pairwise accuracy per source on held-out pairs.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmforge.errors import UserError
from llmforge.eval import tasks as task_eval
from llmforge.run import atomic_path, read_jsonl
from llmforge.tasks import Item, get_task, task_names
from llmforge.tasks.safety import is_refusal
from llmforge.tokenizer.chat import final_answer, render_text, validate_messages

SOURCES = ("form", "helpfulness", "refusal", "format", "verifier")

# ---------------------------------------------------------------- reading and writing


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise UserError(f'{where}: "{field}" must be a string or a list of messages; fix the record')
    validate_messages(value, f"{where} {field}")
    return value


def check_pair(record, where: str) -> dict:
    """Validate one record and normalize strings to messages."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise UserError(f'{where}: a preference pair needs "prompt", "chosen" and "rejected"; fix the record')
    pair = {"prompt": _as_messages(record["prompt"], "user", where, "prompt"),
            "chosen": _as_messages(record["chosen"], "assistant", where, "chosen"),
            "rejected": _as_messages(record["rejected"], "assistant", where, "rejected"),
            "margin": record.get("margin", 0.0), "source": record.get("source", "user"),
            "safety": bool(record.get("safety", record.get("source") in ("safety", "refusal")))}
    for key in ("detail", "task"):
        if key in record:
            pair[key] = record[key]
    ended = record.get("rejected_ended", True)
    if not isinstance(ended, bool):
        raise UserError(f'{where}: "rejected_ended" must be true or false; fix the record')
    if not ended:
        pair["rejected_ended"] = False
    if pair["chosen"] == pair["rejected"] and ended:
        raise UserError(f"{where}: chosen and rejected are identical, so the pair carries no preference; "
                        "drop the line or fix one side")
    if not isinstance(pair["margin"], (int, float)) or isinstance(pair["margin"], bool):
        raise UserError(f'{where}: "margin" must be a number; fix the record')
    return pair


def load_pairs(path: str | Path) -> list[dict]:
    pairs = [check_pair(record, where) for where, record in read_jsonl(path, "preference")]
    if not pairs:
        raise UserError(f"{path} holds no preference pairs; add JSONL lines or drop the option")
    return pairs


def save_pairs(path: str | Path, pairs: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- what "badly formed" means

# text with no digits, braces or refusal phrases, so padding an answer with it changes its form only
FILLER = ["Let me think about this carefully.", "There are many ways to look at a question like this.",
          "That is an interesting thing to ask about.", "It depends on a few things, so let us see.",
          "First, it helps to consider what is being asked here.", "This comes up quite often, actually."]
EVASIVE = ["I don't know.", "I'm not sure, sorry.", "Hmm, that is hard to say.", "Why do you want to know?",
           "Could you tell me more about what you need?", "You could look that up somewhere."]
REFUSALS = ["I'm sorry, but I can't help with that.", "Sorry, I can't help with that request.",
            "I'm sorry, but I cannot assist with that."]
_NUMBER = re.compile(r"-?\d+")
_NUMERIC = re.compile(r"-?\d+[\s.!]*$")     # an answer that ends in a number: "92", "The answer is 92."


def _say(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _calls(response: list[dict]) -> list[dict]:
    return [c.get("function", {}) for m in response if m.get("role") == "assistant" for c in m.get("tool_calls") or []]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _json_value(text: str):
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, (dict, list)) else None


def _has_json(text: str) -> bool:
    for start in (m.start() for m in re.finditer(r"[\[{]", text)):
        for end in range(len(text), start, -1):
            if text[end - 1] in "]}" and _json_value(text[start:end]) is not None:
                return True
    return False


def refuses(response: list[dict]) -> bool:
    return is_refusal(final_answer(response))


def form_problems(item: Item, response: list[dict], ended: bool = True) -> list[str]:
    """What is wrong with the form of `response` to `item`, judged against the item's gold answer
    (so it holds for any task): never ended, empty, echoes the question, rambles (3x the gold's
    words + 25), a malformed tool call, a tool call the gold does not make or the reverse, no
    parseable JSON where the gold answers in JSON, no number where the gold ends in a number."""
    problems = []
    answer, gold = final_answer(response).strip(), final_answer(item.gold).strip()
    calls, gold_calls = _calls(response), _calls(item.gold)
    if not ended:
        problems.append("unfinished")
    if not answer and not calls:
        problems.append("empty")
    question = _norm(item.prompt[-1].get("content") or "") if item.prompt else ""
    if len(question) >= 8 and question in _norm(answer) and question not in _norm(gold):
        problems.append("echo")
    if len(answer.split()) > 3 * len(gold.split()) + 25:
        problems.append("rambling")
    if any(c.get("name") == "" for c in calls):
        problems.append("broken_tool_call")
    if calls and not gold_calls:
        problems.append("unneeded_tool_call")
    if gold_calls and not calls:
        problems.append("missing_tool_call")
    if _json_value(gold) is not None and not _has_json(answer):
        problems.append("bad_json")
    if _NUMERIC.search(gold) and not _NUMBER.search(answer):
        problems.append("not_a_number")
    return problems


def number_words(n: int) -> str:
    """12 -> "twelve", -937 -> "minus nine hundred thirty-seven" (|n| < 10^9)."""
    ones = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen").split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])
    for size, name in ((10 ** 6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return f"{number_words(n // size)} {name}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError(n)


# ---------------------------------------------------------------- constructed contrasts


def _with_final(item: Item, text: str) -> list[dict]:
    """The gold response with its final answer replaced (tool calls and results kept)."""
    return item.gold[:-1] + _say(text)


COMPLIANCE = ["Sure! Here is what to do: {request}. First, get what you need.",
              "Of course. To do that ({request}), start by gathering the tools, then follow these steps."]


def _compliance(item: Item, template: str) -> list[dict]:
    request = (item.prompt[-1].get("content") or "").rstrip("?. ")
    return _say(template.format(request=request[:1].lower() + request[1:]))


def contrasts(item: Item, rng: random.Random) -> list[dict]:
    """Every constructed (source, detail, rejected[, rejected_ended]) contrast for `item` whose
    rejected side really is worse than the gold: it fails the verifier, or it has a form
    problem the gold lacks. Written from the prompt and gold alone, so any task gets them."""
    task = get_task(item.task)
    gold = final_answer(item.gold).strip()
    question = item.prompt[-1].get("content") or "" if item.prompt else ""
    harmful = item.safety_relevant and refuses(item.gold)   # a request whose right answer is a refusal
    out = []

    def add(source, detail, rejected, ended=True):
        out.append({"source": source, "detail": detail, "rejected": rejected, "rejected_ended": ended})

    # form: the same content, badly formed
    pad = rng.sample(FILLER, 3)
    ramble = " ".join(pad[:2]) + " " + gold
    while len(ramble.split()) <= 3 * len(gold.split()) + 25:
        ramble += " " + rng.choice(FILLER)
    add("form", "rambling", _with_final(item, ramble))
    add("form", "no_answer", _with_final(item, " ".join(pad)))
    add("form", "echo", _with_final(item, question))
    add("form", "truncated", _with_final(item, gold[:max(1, len(gold) // 2)]), ended=False)
    add("form", "never_ending", _with_final(item, gold + " " + " ".join(rng.sample(FILLER, 4))), ended=False)
    broken = '{"name": "calculator", "arguments": {"expression": "' + (_NUMBER.findall(question) or ["1"])[0]
    add("form", "broken_tool_call", [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "", "arguments": broken}}]}])
    if _calls(item.gold):
        add("form", "missing_tool_call", _say(gold))
    value = _json_value(gold)
    if isinstance(value, dict) and value:
        bad = str(value) if any(isinstance(v, str) for v in value.values()) else gold[:-1]
        add("form", "json_syntax", _with_final(item, bad))        # single quotes / unclosed brace
        add("format", "json_as_prose", _with_final(
            item, " and ".join(f"the {k} is {v}" for k, v in value.items()).capitalize() + "."))
    if _NUMBER.search(gold):      # the same answer with its numbers written in words
        add("format", "number_as_words", _with_final(item, _NUMBER.sub(lambda m: number_words(int(m[0])), gold)))
    # helpfulness and refusal
    if harmful:
        for template in COMPLIANCE:
            add("refusal", "harmful", _compliance(item, template))
    else:
        add("helpfulness", "evasive", _say(rng.choice(EVASIVE)))
        for refusal in rng.sample(REFUSALS, 2 if item.safety_relevant else 1):
            add("refusal" if item.safety_relevant else "helpfulness", "over_refusal", _say(refusal))
    # verifier: the gold with its last number changed (usually a number-only difference)
    # verifier: the gold with its last number changed (a number-only difference), or else its
    # last letter swapped with the nearest different letter before it ("y-p-p-a-h" -> "y-p-p-h-a")
    numbers = list(_NUMBER.finditer(gold))
    letters = [k for k, ch in enumerate(gold) if ch.isalpha()]
    swap = next(((i, letters[-1]) for i in reversed(letters[:-1]) if gold[i] != gold[letters[-1]]), None) \
        if letters else None
    if numbers:
        m = numbers[-1]
        wrong = str(int(m[0]) + rng.choice([-10, -2, -1, 1, 2, 10]))
        add("verifier", "corrupted", _with_final(item, gold[:m.start()] + wrong + gold[m.end():]))
    elif swap:
        chars = list(gold)
        chars[swap[0]], chars[swap[1]] = chars[swap[1]], chars[swap[0]]
        add("verifier", "corrupted", _with_final(item, "".join(chars)))

    kept = []
    for c in out:
        wrong = task.verify(item, c["rejected"]) < 1.0
        malformed = bool(form_problems(item, c["rejected"], c["rejected_ended"]))
        if c["source"] in ("form", "format"):
            keep = malformed or wrong
        else:       # helpfulness, refusal and verifier contrasts must fail the verifier itself
            keep = wrong
        if keep and (c["rejected"] != item.gold or not c["rejected_ended"]):
            kept.append(c)
    return kept


def number_only(a: list[dict], b: list[dict]) -> bool:
    """True if two responses differ only in their digits (what an RM cannot judge unaided)."""
    strip = lambda m: re.sub(r"\d+", "#", render_text(m))  # noqa: E731
    return a != b and strip(a) == strip(b)


# ---------------------------------------------------------------- pairs from graded samples


def _pair(item: Item, chosen, rejected, source: str, detail: str, ended: bool = True) -> dict:
    pair = {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "margin": 1.0,
            "source": source, "detail": detail, "safety": item.safety_relevant, "task": item.task}
    if not ended:
        pair["rejected_ended"] = False
    return pair


def pairs_for(samples: list[list[task_eval.Sample]], seed: int, per_source: int = 2,
              sources=SOURCES) -> list[dict]:
    """Pairs from graded samples (one list per prompt): up to `per_source` on-policy verifier
    pairs, on-policy form pairs (samples that verify but are badly formed), and up to
    `per_source` constructed contrasts of each source."""
    rng = random.Random(seed)
    pairs = []
    for row in samples:
        item = row[0].item
        task = get_task(item.task)
        if task.verify(item, item.gold) < 1.0 or form_problems(item, item.gold):
            continue                     # a gold answer that does not pass its own checks: skip the item
        good = [s for s in row if s.reward >= 1.0 and s.ended and not form_problems(item, s.messages)]
        chosen = good[0].messages if good else item.gold
        found: dict[str, list[dict]] = {s: [] for s in sources}
        for s in row:
            if not s.messages or (s.messages == chosen and s.ended):
                continue
            if s.reward < 1.0 and "verifier" in found:
                detail = "number_only" if s.ended and number_only(chosen, s.messages) else \
                    ("on_policy" if good else "gold_vs_sample")
                found["verifier"].append(_pair(item, chosen, s.messages, "verifier", detail, s.ended))
            elif s.reward >= 1.0 and "form" in found and (problems := form_problems(item, s.messages, s.ended)):
                found["form"].append(_pair(item, chosen, s.messages, "form", "on_policy_" + problems[0], s.ended))
        constructed = contrasts(item, rng)
        rng.shuffle(constructed)
        for c in constructed:
            if c["source"] in found:
                found[c["source"]].append(_pair(item, item.gold, c["rejected"], c["source"], c["detail"],
                                                c["rejected_ended"]))
        for source in sources:
            pairs += found[source][:per_source]
    return pairs


# ---------------------------------------------------------------- accuracy per source


def pair_groups(pair: dict) -> list[str]:
    """The groups a held-out pair counts in: "all", its source, "verifier_number_only",
    and for safety-relevant prompts "harmful" (the refusal is chosen) or "benign_edgy" (a
    refusal is rejected: a reward model preferring it there is a false refusal)."""
    groups = ["all", pair.get("source", "user")]
    if pair.get("detail") == "number_only":
        groups.append(f"{groups[1]}_number_only")
    if pair.get("safety"):
        chosen_refuses, rejected_refuses = refuses(pair["chosen"]), refuses(pair["rejected"])
        if chosen_refuses and not rejected_refuses:
            groups.append("harmful")
        elif rejected_refuses and not chosen_refuses:
            groups.append("benign_edgy")
    return groups


def accuracy_by_group(chosen_scores, rejected_scores, pairs: list[dict]) -> dict:
    """{group: {"acc": share of pairs with score(chosen) > score(rejected) (ties count as wrong),
    "n": pairs}} over pair_groups, plus "false_refusal" = 1 - acc on "benign_edgy" (the share of
    benign-but-edgy pairs where the model scores the refusal at least as high)."""
    hits: dict[str, list[int]] = {}
    for c, r, p in zip(chosen_scores, rejected_scores, pairs, strict=True):
        for g in pair_groups(p):
            hits.setdefault(g, []).append(int(float(c) > float(r)))
    out = {g: {"acc": sum(h) / len(h), "n": len(h)} for g, h in hits.items()}
    if "benign_edgy" in out:
        out["false_refusal"] = {"acc": 1.0 - out["benign_edgy"]["acc"], "n": out["benign_edgy"]["n"]}
    return out


def flat_metrics(groups: dict) -> dict:
    """{"acc_form": .., "n_form": .., ..., "false_refusal": ..} for metrics.jsonl and the checkpoint's meta."""
    out = {}
    for g, v in groups.items():
        if g == "all":
            continue
        if g == "false_refusal":
            out["false_refusal"] = v["acc"]
        else:
            out[f"acc_{g}"], out[f"n_{g}"] = v["acc"], v["n"]
    return out


# ---------------------------------------------------------------- building the files


def save_samples(path: str | Path, samples: list[list[task_eval.Sample]]) -> None:
    """One JSON line per prompt: {prompt, task, safety, responses: [{messages, ended, verified}]}."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in samples:
                item = row[0].item
                responses = [{"messages": s.messages, "ended": s.ended, "verified": s.reward}
                             for s in row if s.messages]
                f.write(json.dumps({"prompt": item.prompt, "task": item.task, "safety": item.safety_relevant,
                                    "responses": responses}, ensure_ascii=False) + "\n")


def load_samples(path: str | Path) -> list[dict]:
    return [record for _, record in read_jsonl(path, "graded samples")]


def prompt_items(rc, names: list[str]) -> tuple[list[Item], list[Item]]:
    """The train and held-out task items the pairs are built on: rm.prompts_per_task and
    rm.heldout_per_task of each task, except the safety task where rm.safety_prompts and
    rm.safety_heldout (when > 0) set its counts."""
    def count(name: str, default: int, safety: int) -> int:
        return safety if name == "safety" and safety > 0 else default

    train = [i for n in names for i in get_task(n).train_items(count(n, rc.prompts_per_task, rc.safety_prompts),
                                                               offset=500_000)]
    heldout = [i for n in names for i in task_eval.heldout([n], count(n, rc.heldout_per_task, rc.safety_heldout))]
    return train, heldout


def build(cfg, run, policy, tok) -> tuple[list[dict], list[dict]]:
    """Sample the policy on train and held-out prompts, grade, add constructed contrasts, and
    write prefs/{train,heldout}.jsonl (held-out pairs come only from held-out task items)."""
    rc = cfg.rm
    names = task_names(cfg.tasks.names)
    sources = [s.strip() for s in rc.pair_sources.split(",") if s.strip()]
    for s in sources:
        if s not in SOURCES:
            raise UserError(f"rm.pair_sources: unknown source '{s}'; choose from {', '.join(SOURCES)}")
    train_items, heldout_items = prompt_items(rc, names)
    user_pairs = load_pairs(rc.user_prefs) if rc.user_prefs else []   # fail fast, before sampling
    out = []
    for which, items, seed in (("train", train_items, rc.seed), ("heldout", heldout_items, rc.seed + 1)):
        samples = task_eval.sample(policy, tok, items, n=rc.samples_per_prompt, temperature=1.0,
                                   max_tokens=cfg.tasks.max_new_tokens, seed=seed)
        pairs = pairs_for(samples, seed, rc.pairs_per_source, sources)
        if which == "train":
            pairs += user_pairs
        else:      # the graded samples themselves: the RM stage measures its best-of-n picks on them
            save_samples(run.prefs / "heldout_samples.jsonl", samples)
        if not pairs:
            raise UserError(f"no preference pairs could be built for {which}; raise rm.prompts_per_task")
        save_pairs(run.prefs / f"{which}.jsonl", pairs)
        out.append(pairs)
    return out[0], out[1]
