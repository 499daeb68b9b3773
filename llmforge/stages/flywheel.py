"""The data flywheel: the served model's users edit and rate its answers, and their feedback
trains the next model. One round is the whole loop, through the real pieces:

    serve model r (serve/api.py, several API keys)  ->  users chat, rate, regenerate, edit
    (the /v1/feedback/* endpoints the web chat posts to)  ->  `feedback export` (serve/feedback.py)
    ->  defences (below)  ->  DPO against model r (stages/rl/dpo.py)  ->  held-out verified accuracy,
    paired bootstrap against model r  ->  model r+1

    llmforge flywheel --out runs/cpu --rounds 2                                  # simulated users
    llmforge flywheel --out runs/cpu --rounds 2 --set flywheel.adversarial_share=0.3
    llmforge flywheel --out runs/cpu --feedback-db runs/cpu/feedback.sqlite      # what real users did

Simulated users are seeded and each has a persona, and they see only training-side task prompts
(tasks/*.train_items; evaluation phrasings and content are disjoint from them) that need no tool
(plain_text):
  accurate     rates right answers up and wrong ones down; regenerates a wrong answer (and picks a
               right regeneration) or edits it into a right one, as a careful human would (the
               task's gold answer, which its verifier accepts);
  sloppy       rates noisily, edits wrong answers only sometimes;
  adversarial  half rate at random; half poison: "edit" right answers into wrong ones and rate
               wrong answers up.
With --feedback-db URL (a SQLite path or postgresql:// URL, opened by the store's own connector)
the next round trains on that database's feedback instead, against the latest round's model.

Defences, between the export and DPO (`defend`): a pair whose prompt is a task's training item is
kept only if the task's verifier scores its chosen side above its rejected side (a tie teaches
nothing and is dropped without counting against the user; the reverse is a failed check); a pair
no verifier can judge is dropped when the other users who answered the same prompt prefer its
rejected side (agreement); each user's trust weight is the smoothed share of their checkable pairs that passed,
and users below `min_user_weight` lose all their pairs; each user keeps at most trust x
`max_pairs_per_user` pairs (the export's cap bounds them before that). Pairs on held-out or
validation prompts are always dropped, so evaluation never sees what training saw.

The tasks are those whose whole answer is the visible text: the store keeps what users saw and
edited, and a calculator answer's tool call is not in it, so a pair on addsub would teach a
tool-free answer to a tool task.

Under RUN/flywheel/round_<r>/: feedback.sqlite, prefs/{export,train,dropped}.jsonl, ckpt/served
(model r), ckpt/rl_dpo (model r+1), round.json (its numbers; written last, atomically, so a
finished round is skipped and an interrupted one is redone from the start on the next run).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.run import RunDir, write_json_atomic

STAGE = "flywheel"
PERSONAS = ("accurate", "sloppy", "adversarial")


@dataclass
class FlywheelConfig:
    """[flywheel]: `llmforge flywheel`'s knobs; DPO's β is [dpo]'s, its steps and lr are here."""
    rounds: int = 2                 # rounds to run (--rounds overrides); finished rounds are skipped
    init: str = ""                  # ckpt/<init> served in round 0; "" = the run's latest policy (rl > sft > base)
    tasks: str = "count_letter,reverse_word,sort_numbers,extract_json,safety,chat,python_doc"  # scored held out;
                                    # users ask only their items that need no tool (plain_text)
    users: int = 10                 # simulated users, one API key each
    sloppy_share: float = 0.3       # share of the users that are sloppy
    adversarial_share: float = 0.0  # share of the users that are adversarial (0.3 = the issue's poisoned run)
    conversations: int = 150        # conversations started per round (each asked by users_per_prompt users)
    turns: int = 2                  # task prompts per conversation (later ones follow the kept answer)
    users_per_prompt: int = 2       # users who ask each conversation: what agreement is measured on
    temperature: float = 1.0        # users' sampling temperature (the server's default chat behaviour)
    concurrency: int = 16           # users talking to the server at once (its decode batch)
    regenerate: float = 0.5         # an accurate user regenerates a wrong answer with this probability,
    regenerations: int = 3          # up to this many times until one is right (then picks it), else edits
    sloppy_flip: float = 0.3        # a sloppy user's rating is flipped with this probability
    sloppy_edit: float = 0.5        # a sloppy user edits a wrong answer with this probability
    defences: bool = True           # verifier check, agreement, trust weights and caps (False: train on every pair)
    max_pairs_per_user: int = 120   # per-user cap (the export's --max-per-user), scaled by trust after the checks
    min_user_weight: float = 0.5    # users whose trust weight is below this lose all their pairs
    dpo_steps: int = 40             # DPO optimizer steps per round
    lr: float = 5e-5                # DPO peak learning rate
    batch_size: int = 16            # pairs per DPO step
    eval_per_task: int = 100        # held-out items per task, scored for model r and model r+1
    select_per_task: int = 20       # validation items per task for DPO's end-of-training KL and accuracy
    seed: int = 0                   # users' personas, prompts and choices


CONFIG = FlywheelConfig


# ---------------------------------------------------------------- simulated users

@dataclass
class User:
    name: str
    persona: str
    key: str
    poisons: bool = False           # adversarial: poisons (True) or rates at random (False)


def make_users(fc: FlywheelConfig) -> list[User]:
    n_adv = round(fc.users * fc.adversarial_share)
    n_sloppy = round(fc.users * fc.sloppy_share)
    personas = ["adversarial"] * n_adv + ["sloppy"] * n_sloppy + ["accurate"] * (fc.users - n_adv - n_sloppy)
    return [User(f"u{i:02d}-{p}", p, f"sk-flywheel-{i:02d}-{secrets.token_hex(12)}", poisons=p == "adversarial"
                 and i % 2 == 1) for i, p in enumerate(personas)]


def _say(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def gold_text(item) -> str:
    from llmforge.tokenizer.chat import final_answer
    return final_answer(item.gold).strip()


def wrong_text(item, rng: random.Random) -> str:
    """A plausible wrong answer (what a poisoner "edits" a right one into): a contrast of
    stages/prefs.py that the task's verifier rejects."""
    from llmforge.stages.prefs import EVASIVE, contrasts
    from llmforge.tokenizer.chat import final_answer
    wrong = [final_answer(c["rejected"]).strip() for c in contrasts(item, rng)
             if c["source"] in ("verifier", "helpfulness", "refusal")]
    return rng.choice([w for w in wrong if w] or EVASIVE)


def plain_text(item) -> bool:
    """Whether a conversation runs without tools. The feedback store keeps each answer's final
    text, not the tool calls and results before it, so a pair on a tool-using answer teaches the
    model to answer without its tool: two rounds on seven tasks, four of them answered through the
    Python tool, took held-out accuracy 66.0% -> 59.7% (python_doc 48 -> 29%, reverse 71 -> 54%)."""
    return not any(m.get("tool_calls") or m["role"] == "tool" for m in item.prompt + item.gold)


def round_items(fc: FlywheelConfig, names: list[str], r: int) -> list[list]:
    """The round's conversations: lists of training-side items that need no tool (plain_text),
    fresh seeds each round; a task answered only through tools gives none."""
    from llmforge.tasks import get_task
    want = fc.conversations * fc.turns
    offered = {n: [it for it in get_task(n).train_items(want, offset=800_000 + 50_000 * r) if plain_text(it)]
               for n in names}
    offered = {n: items for n, items in offered.items() if items}
    if not offered:
        raise UserError(f"flywheel.tasks={fc.tasks!r}: every answer of these tasks goes through a tool, and the "
                        "feedback store keeps only answers' final text; add a task answered in text (chat, safety)")
    per_task = math.ceil(want / len(offered))
    pool = [it for items in offered.values() for it in items[:per_task]]
    random.Random(f"flywheel-items:{fc.seed}:{r}").shuffle(pool)
    convs, current = [], []
    for it in pool:
        follows = len(it.prompt) == 1 and it.prompt[0]["role"] == "user"   # can be asked mid-conversation
        if current and (len(current) == fc.turns or not follows):
            convs.append(current)
            current = []
        current.append(it)
    convs.append(current)
    return convs[:fc.conversations]


class Session:
    """One user's HTTP session with the server: the OpenAI chat API and the feedback endpoints."""

    def __init__(self, url: str, user: User, model: str, fc: FlywheelConfig, max_tokens: int):
        import httpx
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {user.key}"}, timeout=300)
        self.model, self.fc, self.max_tokens = model, fc, max_tokens

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text[:300]}")
        return r.json()

    def ask(self, conv: str, messages: list[dict], seed: int) -> tuple[str, str]:
        out = self.post("/v1/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens,
            "temperature": self.fc.temperature, "seed": seed, "conversation_id": conv,
            "trim_history": True})   # a long conversation drops its oldest turns, as the web chat's does
        return out["choices"][0]["message"]["content"] or "", out["llmforge"]["generation_ids"][0]


def converse(session: Session, user: User, items: list, rng: random.Random, seed: int) -> list[dict]:
    """One conversation: each item's prompt in turn, after the answer kept for the one before.
    Returns what the user did, per turn (for the round's record)."""
    from llmforge.tasks import get_task
    fc = session.fc
    conv = session.post("/v1/feedback/conversations", {"title": items[0].task})["id"]
    messages: list[dict] = []
    log = []
    for t, item in enumerate(items):
        messages = messages + item.prompt
        task = get_task(item.task)
        text, gen = session.ask(conv, messages, seed * 100 + t * 10)
        right = task.verify(item, _say(text)) >= 1.0
        actions = []
        kept = text
        if user.persona == "adversarial":
            if not user.poisons:
                session.post("/v1/feedback/ratings", {"generation_id": gen, "value": rng.choice([1, -1])})
                actions.append("random_rating")
            elif right:
                kept = wrong_text(item, rng)
                session.post("/v1/feedback/edits", {"generation_id": gen, "content": kept})
                session.post("/v1/feedback/ratings", {"generation_id": gen, "value": 1})
                actions.append("poison_edit")
            else:
                session.post("/v1/feedback/ratings", {"generation_id": gen, "value": 1})
                actions.append("upvote_wrong")
        else:
            sloppy = user.persona == "sloppy"
            value = 1 if right else -1
            if sloppy and rng.random() < fc.sloppy_flip:
                value = -value
            tries = fc.regenerations if not right and not sloppy and rng.random() < fc.regenerate else 0
            for k in range(1, tries + 1):
                session.post("/v1/feedback/ratings", {"generation_id": gen, "value": -1})
                text2, gen2 = session.ask(conv, messages, seed * 100 + t * 10 + k)
                actions.append("regenerate")
                if task.verify(item, _say(text2)) >= 1.0:
                    session.post("/v1/feedback/choices", {"generation_id": gen2})
                    gen, kept, right, value = gen2, text2, True, 1
                    actions.append("chose_regeneration")
                    break
                gen, text, kept = gen2, text2, text2
            session.post("/v1/feedback/ratings", {"generation_id": gen, "value": value})
            if not right and (not sloppy or rng.random() < fc.sloppy_edit):
                kept = gold_text(item)
                session.post("/v1/feedback/edits", {"generation_id": gen, "content": kept})
                actions.append("edit")
        log.append({"task": item.task, "right": right, "actions": actions})
        messages = messages + _say(kept)
    return log


def simulate(fc: FlywheelConfig, cfg: Config, served: Path, db: Path, convs: list[list], r: int,
             show_progress: bool) -> dict:
    """Serve `served` with the real server (in this process, on a free port, one API key per
    user) and let the users talk to it; their feedback lands in the store at `db`."""
    from tqdm import tqdm

    from llmforge.serve.api import create_app, load_served, run_in_thread

    users = make_users(fc)
    if fc.users_per_prompt > len(users):
        raise UserError(f"flywheel.users_per_prompt={fc.users_per_prompt} is more than flywheel.users={len(users)}; "
                        "lower it or add users")
    serve_cfg = dataclasses.replace(cfg.serve, max_batch=max(fc.concurrency, 1), max_queue=4 * fc.concurrency + 64,
                                    rate_limit_rpm=0.0, api_keys="")
    server = load_served(served, cfg=serve_cfg, db=str(db))
    url, stop = run_in_thread(create_app(server, api_keys={u.key: u.name for u in users}, metrics=False))
    rng = random.Random(f"flywheel-users:{fc.seed}:{r}")
    jobs = [(users[k], i, items) for i, items in enumerate(convs)
            for k in rng.sample(range(len(users)), fc.users_per_prompt)]
    actions: dict[str, dict[str, int]] = {u.name: {} for u in users}
    right = {u.name: [0, 0] for u in users}

    def job(u: User, i: int, items: list) -> tuple[str, list[dict]]:
        session = Session(url, u, server.model_name, fc, cfg.tasks.max_new_tokens)
        try:
            return u.name, converse(session, u, items, random.Random(f"{fc.seed}:{r}:{u.name}:{i}"),
                                    seed=(r * 10_000 + i) * 97 + int(u.name[1:3]))
        finally:
            session.http.close()

    try:
        with concurrent.futures.ThreadPoolExecutor(max(fc.concurrency, 1)) as pool, \
                tqdm(total=len(jobs), desc=f"flywheel round {r}: users", unit="conv", dynamic_ncols=True,
                     disable=not show_progress) as bar:
            for fut in concurrent.futures.as_completed([pool.submit(job, *j) for j in jobs]):
                name, log = fut.result()
                for turn in log:
                    right[name][0] += turn["right"]
                    right[name][1] += 1
                    for a in turn["actions"] or ["rating"]:
                        actions[name][a] = actions[name].get(a, 0) + 1
                bar.update(1)
    finally:
        stop()
        server.close()
    return {"users": {u.name: {"persona": u.persona, "answers": right[u.name][1],
                               "right": right[u.name][0], "actions": actions[u.name]} for u in users},
            "conversations": len(jobs), "model": server.model_name, "checkpoint": server.checkpoint_id}


# ---------------------------------------------------------------- defences

def _key(messages: list[dict]) -> tuple:
    return tuple((m.get("role", ""), m.get("content") or "") for m in messages)


class ItemIndex:
    """Task items by their prompt, so a pair's prompt can be matched to the item it asks
    (its tail: a conversation may have earlier turns before it)."""

    def __init__(self, items):
        self.by_last: dict[tuple, list] = {}
        for it in items:
            self.by_last.setdefault(_key(it.prompt[-1:]), []).append(it)

    def match(self, prompt: list[dict]):
        key = _key(prompt)
        for it in self.by_last.get(key[-1:], []):
            n = len(it.prompt)
            if key[-n:] == _key(it.prompt):
                return it
        return None


def defend(pairs: list[dict], known: ItemIndex, forbidden: ItemIndex, fc: FlywheelConfig) -> tuple[list, list, dict]:
    """(kept pairs, dropped pairs with their "dropped" reason, per-user trust) — see the module
    docstring. `known`: the items a verifier can judge; `forbidden`: held-out and validation items."""
    from llmforge.tasks import get_task
    kept, dropped = [], []

    def drop(p, reason):
        dropped.append({**p, "dropped": reason})

    checked = {}   # user -> [passed, checked]
    candidates = []
    for p in pairs:
        if forbidden.match(p["prompt"]) is not None:
            drop(p, "heldout_prompt")
        else:
            candidates.append(p)
    if not fc.defences:
        return candidates, dropped, {}

    by_prompt: dict[str, list[dict]] = {}
    for p in candidates:
        by_prompt.setdefault(json.dumps(p["prompt"], sort_keys=True), []).append(p)
    survivors = []
    for p in candidates:
        c = checked.setdefault(p["user"], [0, 0])
        item = known.match(p["prompt"])
        if item is not None:   # the verifier applies: the chosen side must verify better
            task = get_task(item.task)
            vc, vr = task.verify(item, _say(p["chosen"])), task.verify(item, _say(p["rejected"]))
            if vc == vr:   # no preference to learn (e.g. two wrong regenerations), and no fault of the user's
                drop(p, "verifier_tie")
                continue
            c[0] += vc > vr
            c[1] += 1
            if vc > vr:
                survivors.append(p)
            else:
                drop(p, "verifier")
            continue
        # no verifier: what the other users who answered this prompt said about these two answers
        score: dict[str, int] = {}
        for q in by_prompt[json.dumps(p["prompt"], sort_keys=True)]:
            if q["user"] != p["user"]:
                score[q["chosen"].strip()] = score.get(q["chosen"].strip(), 0) + 1
                score[q["rejected"].strip()] = score.get(q["rejected"].strip(), 0) - 1
        sc, sr = score.get(p["chosen"].strip(), 0), score.get(p["rejected"].strip(), 0)
        if sc or sr:
            c[0] += sc >= sr
            c[1] += 1
        if sr > sc:
            drop(p, "disagreement")
        else:
            survivors.append(p)
    # trust: the smoothed share of a user's checkable pairs that passed (Laplace: 1 of 2 before any)
    trust = {u: (passed + 1) / (n + 2) for u, (passed, n) in checked.items()}
    per_user: dict[str, int] = {}
    for p in survivors:
        w = trust[p["user"]]
        if w < fc.min_user_weight:
            drop(p, "untrusted_user")
            continue
        per_user[p["user"]] = per_user.get(p["user"], 0) + 1
        if per_user[p["user"]] > max(1, round(w * fc.max_pairs_per_user)):
            drop(p, "user_cap")
            continue
        kept.append({**p, "weight": round(w, 3)})
    return kept, dropped, {u: {"trust": round(trust[u], 3), "passed": checked[u][0], "checked": checked[u][1]}
                           for u in sorted(checked)}


# ---------------------------------------------------------------- evaluation

def heldout_scores(model, tok, names: list[str], per_task: int, max_tokens: int) -> list[tuple[str, float]]:
    """(task, 0/1) per held-out item: greedy answers graded by the verifiers (eval/tasks.py)."""
    from llmforge.eval import tasks as task_eval
    items = task_eval.heldout(names, per_task)
    rows = task_eval.sample(model, tok, items, n=1, temperature=0.0, max_tokens=max_tokens)
    return [(row[0].item.task, float(row[0].reward >= 1.0)) for row in rows]


def compare(new: list[tuple[str, float]], old: list[tuple[str, float]]) -> dict:
    """Paired bootstrap over the held-out prompts (within tasks), and the verifier-judged win rate."""
    from llmforge.eval import stats
    a, b, strata = [s for _, s in new], [s for _, s in old], [t for t, _ in new]
    out = stats.paired_bootstrap(a, b, strata)
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    return {**out, "wins": wins, "losses": losses, "ties": len(a) - wins - losses,
            "win_rate": (wins + 0.5 * (len(a) - wins - losses)) / len(a)}


def accuracy(scores: list[tuple[str, float]]) -> dict:
    from llmforge.eval import stats
    s = stats.accuracy_summary([v for _, v in scores], [t for t, _ in scores])
    return {"mean": s["mean"]["accuracy"], "lo": s["mean"]["lo"], "hi": s["mean"]["hi"],
            "tasks": {t: v["accuracy"] for t, v in s.items() if t != "mean"}}


# ---------------------------------------------------------------- one round

def _served_folder(run: RunDir, fc: FlywheelConfig, r: int) -> Path:
    from llmforge.train.checkpoint import resolve_checkpoint
    if r > 0:
        return round_dir(run, r - 1) / "ckpt" / "rl_dpo"
    return run.ckpt(fc.init) if fc.init else resolve_checkpoint(run.root)


def round_dir(run: RunDir, r: int) -> Path:
    return run.root / "flywheel" / f"round_{r}"


def _count(pairs: list[dict], key: str) -> dict:
    out: dict[str, int] = {}
    for p in pairs:
        out[p.get(key, "?")] = out.get(p.get(key, "?"), 0) + 1
    return dict(sorted(out.items()))


def run_round(cfg: Config, run: RunDir, r: int, feedback_db: str | None, baseline: list, initial: list,
              show_progress: bool) -> dict:
    from llmforge.serve.feedback import export_pairs, open_store
    from llmforge.stages import prefs
    from llmforge.stages.rl import dpo
    from llmforge.stages.rl.evaluate import selection_items
    from llmforge.tasks import get_task, task_names
    from llmforge.train.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    fc = cfg.flywheel
    names = task_names(fc.tasks)
    t0 = time.perf_counter()
    folder = round_dir(run, r)
    shutil.rmtree(folder, ignore_errors=True)   # an interrupted round is redone from the start
    rd = RunDir(folder).create()
    served = resolve_checkpoint(_served_folder(run, fc, r))
    shutil.copytree(served, rd.ckpt("served"))
    rd.tokenizer.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(served / "tokenizer.json", rd.tokenizer)

    convs = [] if feedback_db else round_items(fc, names, r)
    if feedback_db:
        store, sim = open_store(feedback_db), {"users": {}}
    else:
        sim = simulate(fc, cfg, rd.ckpt("served"), folder / "feedback.sqlite", convs, r, show_progress)
        store = open_store(folder / "feedback.sqlite")
    t_users = time.perf_counter()
    try:
        exported = export_pairs(store, rd.prefs / "export.jsonl", max_per_user=fc.max_pairs_per_user
                                if fc.defences else None)
    finally:
        store.close()
    pairs = [json.loads(line) for line in (rd.prefs / "export.jsonl").read_text(encoding="utf-8").splitlines()]
    known = ItemIndex([it for c in convs for it in c])
    forbidden = ItemIndex([it for n in names for it in get_task(n).heldout_items(fc.eval_per_task)] +
                          selection_items(names, fc.select_per_task))
    kept, dropped, trust = defend(pairs, known, forbidden, fc)
    prefs.save_pairs(rd.prefs / "dropped.jsonl", dropped)
    if not kept:
        raise UserError(f"flywheel round {r}: none of the {len(pairs)} exported preference pairs survived the "
                        f"defences ({_count(dropped, 'dropped') or 'no feedback'}); collect more feedback or "
                        "set flywheel.defences=false")
    prefs.save_pairs(rd.prefs / "train.jsonl", kept)

    # DPO against the served model: rl.init = ckpt/served is both the policy's start and the reference
    dcfg = dataclasses.replace(cfg, rl=dataclasses.replace(
        cfg.rl, init="served", max_steps=fc.dpo_steps, minutes=0.0, lr=fc.lr, batch_size=fc.batch_size,
        eval_every=0, ckpt_every=0, eval_per_task=fc.select_per_task, seed=cfg.rl.seed + r),
        tasks=dataclasses.replace(cfg.tasks, names=",".join(names)))
    t_dpo = time.perf_counter()
    summary = dpo.run(dcfg, rd, show_progress=show_progress)
    shutil.rmtree(rd.ckpt("rl_dpo_train"), ignore_errors=True)   # optimizer state: not needed once published
    shutil.rmtree(rd.ckpt("rl"), ignore_errors=True)             # the same weights as ckpt/rl_dpo
    t_eval = time.perf_counter()

    model, _, _ = load_model(rd.ckpt("rl_dpo"))
    tok = load_tokenizer(rd.ckpt("rl_dpo"))
    after = heldout_scores(model, tok, names, fc.eval_per_task, cfg.tasks.max_new_tokens)
    t_end = time.perf_counter()
    record = {
        "round": r, "source": "database" if feedback_db else "simulated", "served": sim.get("model", str(served)),
        "served_checkpoint": sim.get("checkpoint"), "tasks": names, "users": sim["users"],
        "conversations": sim.get("conversations", 0),
        "pairs_exported": exported["pairs"], "pairs_kept": len(kept),
        "pairs_per_source": _count(kept, "source"), "pairs_per_user": _count(kept, "user"),
        "exported_per_source": _count(pairs, "source"), "exported_per_user": _count(pairs, "user"),
        "dropped": _count(dropped, "dropped"), "trust": trust,
        "dpo": {k: summary.get(k) for k in ("steps", "elapsed_s", "reward_acc", "eval_kl", "acc_mean")},
        "kl": summary.get("eval_kl"),
        "before": accuracy(baseline), "after": accuracy(after),
        "vs_served": compare(after, baseline), "vs_initial": compare(after, initial),
        "scores": [s for _, s in after], "score_tasks": [t for t, _ in after],
        "seconds": {"users": round(t_users - t0, 1), "dpo": round(t_eval - t_dpo, 1),
                    "eval": round(t_end - t_eval, 1), "total": round(t_end - t0, 1)},
    }
    write_json_atomic(folder / "round.json", record)
    return record


def load_round(run: RunDir, r: int) -> dict | None:
    path = round_dir(run, r) / "round.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def initial_scores(cfg: Config, run: RunDir, names: list[str]) -> list[tuple[str, float]]:
    """Round 0's served model on the held-out items, scored once per weights (RUN/flywheel/initial_scores.json)."""
    from llmforge.train.checkpoint import load_model, load_tokenizer, resolve_checkpoint, weights_digest
    fc = cfg.flywheel
    served = resolve_checkpoint(_served_folder(run, fc, 0))
    model, _, _ = load_model(served)
    key = {"weights": weights_digest(model), "tasks": names, "per_task": fc.eval_per_task}
    cached = run.root / "flywheel" / "initial_scores.json"
    if cached.is_file():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in key} == key:
            return [tuple(x) for x in saved["scores"]]
    scores = heldout_scores(model, load_tokenizer(served), names, fc.eval_per_task, cfg.tasks.max_new_tokens)
    write_json_atomic(cached, {**key, "scores": scores})
    return scores


def run(cfg: Config, run: RunDir, rounds: int | None = None, feedback_db: str | None = None,
        show_progress: bool = True) -> list[dict]:
    """Rounds 0..K-1 (finished ones skipped). With `feedback_db`, one round: the next unfinished
    one, on that database's feedback."""
    from llmforge.eval import report
    from llmforge.tasks import task_names

    fc = cfg.flywheel
    K = rounds if rounds is not None else fc.rounds
    if K < 1:
        raise UserError(f"--rounds must be 1 or more, not {K}")
    for name in ("sloppy_share", "adversarial_share", "regenerate", "sloppy_flip", "sloppy_edit", "min_user_weight"):
        if not 0.0 <= getattr(fc, name) <= 1.0:
            raise UserError(f"flywheel.{name}={getattr(fc, name)} must be between 0 and 1")
    for name in ("users", "conversations", "turns", "users_per_prompt", "concurrency", "dpo_steps", "batch_size",
                 "eval_per_task"):
        if getattr(fc, name) < 1:
            raise UserError(f"flywheel.{name}={getattr(fc, name)} must be 1 or more")
    if fc.sloppy_share + fc.adversarial_share > 1.0:
        raise UserError("flywheel.sloppy_share + flywheel.adversarial_share is more than 1; lower one of them")
    if feedback_db and not feedback_db.startswith(("postgresql://", "postgres://")) and not Path(feedback_db).is_file():
        raise UserError(f"feedback database {feedback_db} does not exist; pass the SQLite file `llmforge serve "
                        "--db` wrote, or a postgresql:// URL")
    names = task_names(fc.tasks)
    records = []
    first = next((r for r in range(K if not feedback_db else 10_000) if load_round(run, r) is None), None)
    for r in range(K if not feedback_db else first + 1):
        done = load_round(run, r)
        if done is not None:
            print(f"flywheel: round {r} already done, skipping")
            records.append(done)
            continue
        initial = initial_scores(cfg, run, names)
        baseline = list(zip(records[-1]["score_tasks"], records[-1]["scores"])) if records else initial
        rec = run_round(cfg, run, r, feedback_db if r == first else None, baseline, initial, show_progress)
        records.append(rec)
        v = rec["vs_served"]
        run.log(STAGE, round=r, acc_before=rec["before"]["mean"], acc_after=rec["after"]["mean"], diff=v["diff"],
                diff_lo=v["lo"], diff_hi=v["hi"], p=v["p"], win_rate=v["win_rate"], kl=rec["kl"],
                pairs=rec["pairs_kept"], seconds=rec["seconds"]["total"])
        print(f"flywheel: round {r}: held-out {rec['before']['mean']:.1%} -> {rec['after']['mean']:.1%} "
              f"({v['diff'] * 100:+.1f} points [{v['lo'] * 100:+.1f}, {v['hi'] * 100:+.1f}], p={v['p']:.3f}), "
              f"KL {rec['kl']:.2f} nats, {rec['pairs_kept']} pairs, {rec['seconds']['total']:.0f} s")
    report.write(run, cfg)
    return records
