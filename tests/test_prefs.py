"""Preference pairs for the reward models (stages/prefs.py) and the verifier + RM reward
(stages/reward.verifier_plus_rm): constructed contrasts are really worse, every pair is tagged
with its source, accuracy per source is counted right, the combination does what it says."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from llmforge.eval.tasks import Sample
from llmforge.stages import prefs
from llmforge.stages.reward import encode_pairs, verifier_plus_rm
from llmforge.tasks import TASKS, Item, get_task
from llmforge.tokenizer.chat import END, final_answer


def _items(per_task=12):
    return [i for t in TASKS.values() for i in t.train_items(per_task)]


def _say(text):
    return [{"role": "assistant", "content": text}]


def _sample(item, messages, ended=True):
    reward = get_task(item.task).verify(item, messages)
    return Sample(item, [], SimpleNamespace(finish_reason="stop" if ended else "length"), messages, reward)


def test_every_constructed_contrast_is_worse_than_the_gold():
    seen = set()
    for item in _items():
        task = get_task(item.task)
        assert task.verify(item, item.gold) == 1.0 and prefs.form_problems(item, item.gold) == [], item.task
        for c in prefs.contrasts(item, random.Random(item.seed)):
            assert c["source"] in prefs.SOURCES
            seen.add(c["source"])
            verified = task.verify(item, c["rejected"]) >= 1.0
            malformed = prefs.form_problems(item, c["rejected"], c["rejected_ended"])
            assert not verified or malformed, (item.task, c)
            if c["source"] in ("helpfulness", "refusal", "verifier"):
                assert not verified, (item.task, c)     # judged by the verifier itself, not by form
    assert seen == set(prefs.SOURCES)


def test_form_problems_name_what_is_wrong():
    item = Item("extract_json", 0, [{"role": "user", "content": "Extract name as JSON: Bob is here."}],
                {"name": "Bob"}, _say('{"name": "Bob"}'))
    assert prefs.form_problems(item, item.gold) == []
    assert prefs.form_problems(item, _say('{"name": "Bob"}'), ended=False) == ["unfinished"]
    assert "bad_json" in prefs.form_problems(item, _say("{'name': 'Bob'}"))
    assert "echo" in prefs.form_problems(item, _say("Extract name as JSON: Bob is here."))
    assert "rambling" in prefs.form_problems(item, _say('{"name": "Bob"} ' + "and so on " * 30))
    broken = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "", "arguments": '{"name": "calc'}}]}]
    assert {"broken_tool_call", "unneeded_tool_call"} <= set(prefs.form_problems(item, broken))
    numeric = Item("addsub", 0, [{"role": "user", "content": "2 + 2?"}], 4, _say("The answer is 4."))
    assert prefs.form_problems(numeric, _say("The answer is four.")) == ["not_a_number"]
    assert prefs.number_words(-937) == "minus nine hundred thirty-seven"
    assert prefs.number_words(66127) == "sixty-six thousand one hundred twenty-seven"


def test_pairs_from_samples_are_tagged_and_verifier_pairs_are_right():
    # a task that answers through a tool and ends in a number (addsub): the wrong answer keeps the call
    item = next(i for i in _items(40) if not i.safety_relevant and prefs._NUMERIC.search(final_answer(i.gold)))
    gold = final_answer(item.gold)
    m = list(prefs._NUMBER.finditer(gold))[-1]
    wrong = item.gold[:-1] + _say(gold[:m.start()] + str(int(m[0]) + 1) + gold[m.end():])
    row = [_sample(item, item.gold), _sample(item, wrong), _sample(item, item.gold, ended=False),
           _sample(item, _say("I don't know."))]
    assert [s.reward for s in row] == [1.0, 0.0, 1.0, 0.0]
    pairs = prefs.pairs_for([row], seed=0, per_source=3)
    assert {p["source"] for p in pairs} == set(prefs.SOURCES) - {"refusal"}   # refusal: safety prompts only
    task = get_task(item.task)
    for p in pairs:
        assert p["source"] in prefs.SOURCES and p["task"] == item.task and p["chosen"] != p["rejected"] \
            or p.get("rejected_ended") is False
        if p["source"] != "form":      # form pairs may verify on both sides; the others never do
            assert task.verify(item, p["chosen"]) == 1.0 > task.verify(item, p["rejected"]), p
    details = {(p["source"], p["detail"]) for p in pairs}
    assert ("verifier", "number_only") in details              # the on-policy sample one digit off
    assert ("form", "on_policy_unfinished") in details         # correct, but never ended
    unfinished = next(p for p in pairs if p["detail"] == "on_policy_unfinished")
    assert unfinished["rejected_ended"] is False and unfinished["rejected"] == unfinished["chosen"]
    # they survive a round trip through the JSONL file
    back = [prefs.check_pair(json.loads(json.dumps(p)), "x") for p in pairs]
    assert [(b["source"], b.get("detail"), b.get("rejected_ended", True)) for b in back] == \
        [(p["source"], p["detail"], p.get("rejected_ended", True)) for p in pairs]


def test_accuracy_by_group_on_a_hand_built_example():
    ask = [{"role": "user", "content": "q"}]
    refusal, answer = _say("I'm sorry, but I can't help with that."), _say("Use soft light.")
    pairs = [
        {"source": "form", "chosen": _say("4"), "rejected": _say("4 4 4")},
        {"source": "form", "chosen": _say("4"), "rejected": _say("")},
        {"source": "verifier", "detail": "number_only", "chosen": _say("937"), "rejected": _say("936")},
        {"source": "verifier", "detail": "on_policy", "chosen": _say("937"), "rejected": _say("nine")},
        {"source": "refusal", "safety": True, "chosen": refusal, "rejected": _say("Sure, here is how.")},
        {"source": "refusal", "safety": True, "chosen": answer, "rejected": refusal},
        {"source": "refusal", "safety": True, "chosen": answer, "rejected": refusal},
    ]
    for p in pairs:
        p["prompt"] = ask
    chosen = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 1.0, 0.5])
    rejected = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.5])   # the last is a tie: counts as wrong
    got = prefs.accuracy_by_group(chosen, rejected, pairs)
    assert got["all"] == {"acc": 4 / 7, "n": 7}
    assert got["form"] == {"acc": 0.5, "n": 2}
    assert got["verifier"] == {"acc": 0.5, "n": 2}
    assert got["verifier_number_only"] == {"acc": 0.0, "n": 1}
    assert got["refusal"] == {"acc": 2 / 3, "n": 3}
    assert got["harmful"] == {"acc": 1.0, "n": 1}
    assert got["benign_edgy"] == {"acc": 0.5, "n": 2} and got["false_refusal"] == {"acc": 0.5, "n": 2}
    flat = prefs.flat_metrics(got)
    assert flat["acc_form"] == 0.5 and flat["n_verifier_number_only"] == 1 and flat["false_refusal"] == 0.5
    assert "acc_all" not in flat


def test_verifier_plus_rm_lets_the_verifier_decide_and_the_rm_break_ties():
    rm = torch.tensor([5.0, -5.0, 0.0, 1.0, -1.0])
    verified = torch.tensor([0.0, 1.0, 1.0, math.nan, math.nan])
    reward = verifier_plus_rm(verified, rm, weight=0.2)
    # a correct answer beats every wrong one, however the RM scores them
    assert reward[1] > reward[0]
    assert torch.allclose(reward[:3], verified[:3] + 0.2 * torch.tanh(rm[:3]))
    assert reward[2] == 1.0 and reward[0] < 0.2
    # no verifier: the (normalized) RM score alone
    assert torch.equal(reward[3:], rm[3:])
    assert torch.equal(verifier_plus_rm(None, rm, 0.2), rm)
    # within one verdict, the RM orders answers
    same = verifier_plus_rm(torch.ones(3), torch.tensor([-1.0, 0.0, 2.0]), 0.2)
    assert same[0] < same[1] < same[2]
    worst_right = verifier_plus_rm(torch.tensor([1.0]), torch.tensor([-1e9]), 0.5)
    best_wrong = verifier_plus_rm(torch.tensor([0.0]), torch.tensor([1e9]), 0.5)
    assert worst_right >= best_wrong


class _Tok:
    """Just enough of a tokenizer for render(): one id per character, specials above 1000."""
    specials = ["<|bos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool_call|>",
                "<|tool_result|>", "<|end|>"]

    def token_id(self, text):
        return 1000 + self.specials.index(text)

    def encode(self, text):
        return [ord(c) for c in text]


def test_unfinished_rejected_is_scored_without_its_end():
    tok = _Tok()
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": _say("hello"), "rejected": _say("hello"),
            "margin": 1.0, "rejected_ended": False}
    (chosen, rejected, margin), = encode_pairs(tok, [pair], 64)[0]
    assert chosen[-1] == tok.token_id(END) and rejected == chosen[:-1] and margin == 1.0
    same = {**pair, "rejected_ended": True}
    assert encode_pairs(tok, [same], 64) == ([], [])       # no difference left: dropped
    with pytest.raises(Exception, match="identical"):
        prefs.check_pair({k: v for k, v in same.items() if k != "rejected_ended"}, "x")


class _LengthRM:
    """A stand-in reward model that scores a sequence by its length."""
    trunk = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=512))

    def score_last(self, ids, lengths):
        return lengths.float()


def test_best_of_n_compares_the_rm_pick_with_the_average_sample():
    from llmforge.stages.reward import best_of_n
    ask = [{"role": "user", "content": "2+2?"}]
    groups = [   # the longer answer wins under _LengthRM
        {"prompt": ask, "responses": [{"messages": _say("4"), "ended": True, "verified": 1.0},
                                      {"messages": _say("5 or so"), "ended": True, "verified": 0.0}]},
        {"prompt": ask, "responses": [{"messages": _say("four, I think"), "ended": True, "verified": 1.0},
                                      {"messages": _say("5"), "ended": True, "verified": 0.0},
                                      {"messages": _say("6"), "ended": False, "verified": 0.0}]},
        {"prompt": ask, "responses": [{"messages": _say("4"), "ended": True, "verified": 1.0}]},  # n=1: skipped
    ]
    got = best_of_n(_LengthRM(), _Tok(), groups, pad_id=0)
    assert got == {"bon_prompts": 2, "bon_verified_pick": 0.5, "bon_verified_mean": (1 / 2 + 1 / 3) / 2,
                   "bon_verified_any": 1.0}


def test_score_sequences_batches_by_length_and_keeps_the_input_order():
    from llmforge.model.heads import ScalarHeadModel
    from llmforge.config import ModelConfig
    from llmforge.model.transformer import Transformer
    from llmforge.stages.rl.rewards import score_sequences
    torch.manual_seed(0)
    rm = ScalarHeadModel(Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                                                 max_seq_len=32))).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (23,), generator=g)]
    one_by_one = torch.cat([score_sequences(rm, [s], pad_id=0) for s in seqs])
    batched = score_sequences(rm, seqs, pad_id=0, batch=4)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    lengths = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    assert lengths != list(range(len(seqs)))          # the test data really is out of length order


def test_safety_prompts_get_their_own_counts():
    from llmforge.config import RMConfig
    rc = RMConfig(prompts_per_task=3, heldout_per_task=2, safety_prompts=7, safety_heldout=5)
    train, heldout = prefs.prompt_items(rc, ["addsub", "safety"])
    assert [i.task for i in train].count("safety") == 7 and [i.task for i in train].count("addsub") == 3
    assert [i.task for i in heldout].count("safety") == 5 and [i.task for i in heldout].count("addsub") == 2
    assert all(i.split == "eval" for i in heldout) and all(i.split == "train" for i in train)
    train, heldout = prefs.prompt_items(RMConfig(prompts_per_task=3, heldout_per_task=2), ["safety"])
    assert len(train) == 3 and len(heldout) == 2
