"""The flywheel (stages/flywheel.py) on the micro preset with a tiny random model: simulated users
through the real server and feedback store, the export, the defences, DPO, resume after a kill,
and a round from a real feedback database."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmforge.config import resolve
from llmforge.errors import UserError
from llmforge.run import RunDir
from llmforge.serve.feedback import open_store
from llmforge.serve.tiny import make_tiny_checkpoint
from llmforge.stages import flywheel
from llmforge.tasks import get_task


def tiny_run(root) -> RunDir:
    run = RunDir(root).create()
    make_tiny_checkpoint(run.ckpt("sft"), max_seq_len=512)
    return run


def micro(*overrides):
    return resolve("micro", overrides=list(overrides))


def test_micro_flywheel_runs_through_the_real_server_and_store(tmp_path):
    run = tiny_run(tmp_path / "run")
    cfg = micro("flywheel.adversarial_share=0.5")
    [rec] = flywheel.run(cfg, run, rounds=1, show_progress=False)
    folder = flywheel.round_dir(run, 0)
    users = set(rec["users"])
    assert sorted(u["persona"] for u in rec["users"].values()) == ["accurate", "adversarial", "adversarial", "sloppy"]
    # every conversation was created through the API under its user's key
    store = open_store(folder / "feedback.sqlite")
    try:
        assert all(store.conversations(user=u) for u in users)
    finally:
        store.close()
    exported = [json.loads(x) for x in (folder / "prefs" / "export.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (folder / "prefs" / "train.jsonl").read_text().splitlines()]
    assert exported and trained and rec["pairs_kept"] == len(trained)
    assert {p["user"] for p in exported} <= users and {p["user"] for p in trained} <= users
    assert not any(u.endswith("adversarial") for u in rec["pairs_per_user"])   # a random model: every poison caught
    assert sum(rec["dropped"].values()) + len(trained) == len(exported)
    assert (folder / "ckpt" / "rl_dpo" / "model.safetensors").is_file()
    assert rec["vs_served"]["n"] == len(rec["scores"]) and rec["kl"] is not None
    assert "## Flywheel" in run.report.read_text()
    assert [m["round"] for m in run.read_metrics("flywheel")] == [0]


def _item_pairs(items, user, poison):
    """gold > a wrong answer for each item (or the reverse: planted poison)."""
    from llmforge.stages.flywheel import gold_text, wrong_text
    import random
    out = []
    for it in items:
        good, bad = gold_text(it), wrong_text(it, random.Random(it.seed))
        chosen, rejected = (bad, good) if poison else (good, bad)
        out.append({"prompt": it.prompt, "chosen": chosen, "rejected": rejected, "source": "edit", "user": user})
    return out


def test_defences_drop_planted_poison():
    fc = micro().flywheel
    task = get_task("count_letter")
    items = task.train_items(6, offset=800_000)
    held = task.heldout_items(2)
    free = [{"role": "user", "content": "Which colour do you like?"}]   # no verifier applies
    pairs = (_item_pairs(items[:3], "honest", poison=False) + _item_pairs(items[3:], "mallory", poison=True) +
             _item_pairs(held[:1], "honest", poison=False) + [
                 {"prompt": free, "chosen": "Blue.", "rejected": "Red.", "source": "rating", "user": "honest"},
                 {"prompt": free, "chosen": "Blue.", "rejected": "Red.", "source": "rating", "user": "carol"},
                 {"prompt": free, "chosen": "Red.", "rejected": "Blue.", "source": "edit", "user": "eve"},
                 {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "No.", "rejected": "Hi!",
                  "source": "edit", "user": "mallory"}])
    kept, dropped, trust = flywheel.defend(pairs, flywheel.ItemIndex(items), flywheel.ItemIndex(held), fc)
    reasons = {(p["user"], p["dropped"]) for p in dropped}
    assert [p["dropped"] for p in dropped if p["user"] == "mallory"] == ["verifier"] * 3 + ["untrusted_user"]
    assert ("eve", "disagreement") in reasons and ("honest", "heldout_prompt") in reasons
    assert {p["user"] for p in kept} == {"honest", "carol"} and len(kept) == 5
    assert trust["mallory"]["trust"] < fc.min_user_weight < trust["honest"]["trust"]
    # without defences every pair but the held-out one trains
    import dataclasses
    open_kept, open_dropped, _ = flywheel.defend(pairs, flywheel.ItemIndex(items), flywheel.ItemIndex(held),
                                                 dataclasses.replace(fc, defences=False))
    assert len(open_kept) == len(pairs) - 1 and [p["dropped"] for p in open_dropped] == ["heldout_prompt"]


@pytest.mark.slow
def test_a_killed_round_is_redone_and_a_finished_one_skipped(tmp_path):
    run = tiny_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "llmforge.cli", "flywheel", "--out", str(run.root), "--preset", "micro",
           "--rounds", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    round1 = flywheel.round_dir(run, 1)
    deadline = time.time() + 120
    while not (round1 / "feedback.sqlite").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = (flywheel.round_dir(run, 0) / "round.json").read_text()
    assert not (round1 / "round.json").exists()
    records = flywheel.run(micro(), run, rounds=2, show_progress=False)
    assert (flywheel.round_dir(run, 0) / "round.json").read_text() == first   # skipped, not redone
    assert [r["round"] for r in records] == [0, 1] and (round1 / "round.json").is_file()
    # round 1 served round 0's model, and its baseline is round 0's after-scores
    assert records[1]["before"] == records[0]["after"]


def test_a_round_from_a_real_feedback_database(tmp_path):
    run = tiny_run(tmp_path / "run")
    db = tmp_path / "people.sqlite"
    store = open_store(db)
    for user, answer in (("alice", "Rarely: once the soil is dry."), ("bob", "Water it every few weeks.")):
        conv = store.new_conversation(user=user)
        prompt = [{"role": "user", "content": "How do I water a cactus?"}]
        gen = store.log_generation(conv, prompt, "zzz", model="m", checkpoint="m@1", user=user)
        store.edit(gen, answer, user=user)
    store.close()
    [rec] = flywheel.run(micro(), run, feedback_db=str(db), show_progress=False)
    assert rec["source"] == "database" and rec["pairs_per_user"] == {"alice": 1, "bob": 1}


def test_bad_flywheel_input_is_one_clear_line(tmp_path, capsys):
    from llmforge.cli import main
    run = tiny_run(tmp_path / "run")
    assert main(["flywheel", "--out", str(run.root), "--preset", "micro", "--rounds", "0"]) == 2
    assert "--rounds must be 1 or more" in capsys.readouterr().err
    assert main(["flywheel", "--out", str(run.root), "--preset", "micro", "--feedback-db", "nope.sqlite"]) == 2
    assert "nope.sqlite does not exist" in capsys.readouterr().err
    with pytest.raises(UserError, match="adversarial_share"):
        flywheel.run(micro("flywheel.adversarial_share=1.5"), run)
    with pytest.raises(UserError, match="flywheel.turns=0 must be 1 or more"):
        flywheel.run(micro("flywheel.turns=0"), run)


def test_users_ask_only_what_the_store_can_keep_whole():
    """The store keeps an answer's final text, not its tool calls: users get no tool-using items."""
    fc = micro().flywheel
    convs = flywheel.round_items(fc, ["count_letter", "chat", "python_doc"], 0)
    items = [item for conv in convs for item in conv]
    assert items and all(flywheel.plain_text(item) for item in items)
    assert {item.task for item in items} == {"chat", "python_doc"}   # counting always calls Python
    assert not flywheel.plain_text(get_task("count_letter").train_items(1)[0])
    with pytest.raises(UserError, match="through a tool"):
        flywheel.round_items(fc, ["count_letter", "sort_numbers"], 0)
