"""The lm-evaluation-harness "llmforge" model: its scores equal a by-hand computation with our
model, and lm_eval runs local tasks (data written by the test) of all three request types."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON files only, never the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")

from lm_eval.api.instance import Instance

from llmforge.config import ModelConfig
from llmforge.interop.lm_eval_adapter import LLMForgeLM
from llmforge.model.transformer import Transformer
from llmforge.train.checkpoint import save_checkpoint



TEXTS = ["The cat sat on the mat.", "The dog sat on the log.", "1 + 1 = 2", "2 + 2 = 4",
         "def add(a, b):\n    return a + b\n"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llmforge.tokenizer.bpe import Tokenizer
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    # a few steps on the texts so the model prefers them (scores that mean something)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [[tok.eot_id] + tok.encode(t) for t in TEXTS[:5]]
    width = max(map(len, rows))
    batch = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r in rows])
    for _ in range(30):
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("lmeval") / "ckpt"
    save_checkpoint(path, model.eval(), kind="base", model_cfg=cfg, tokenizer=tok)
    return path


def by_hand(lm: LLMForgeLM, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    total, greedy = 0.0, True
    with torch.no_grad():
        for k, target in enumerate(cont_ids):
            logits = lm.model(torch.tensor([ctx_ids + cont_ids[:k]]))[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            total += float(logp[target])
            greedy &= int(logits.argmax()) == target
    return total, greedy


def test_loglikelihood_and_rolling_equal_by_hand(checkpoint):
    lm = LLMForgeLM(checkpoint=str(checkpoint), batch_size=2)
    reqs = [("The cat sat on the", " mat."), ("The cat sat on the ", "return 4."), ("", "2 + 2 = 4"),
            ("1 + 1 =", " 2")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)])
    for (ctx, cont), (score, greedy) in zip(reqs, got):
        c, k = lm.encode_pair(ctx, cont) if ctx else (lm.prefix, lm.encode(cont))
        assert c[0] == lm.tok.eot_id  # documents start after <|eot|>, as in pretraining
        expect, expect_greedy = by_hand(lm, c, k)
        assert score == pytest.approx(expect, abs=1e-4)
        assert greedy == expect_greedy
    assert got[0][0] > got[1][0]  # the trained model prefers the text it saw
    # a chat-template prompt starts with <|bos|> as SFT conversations do: no extra prefix
    chat = lm.apply_chat_template([{"role": "user", "content": "2 + 2 ="}])
    ctx, cont = lm.encode_pair(chat, " 4")
    assert ctx[:2] == [lm.tok.bos_id, lm.tok.token_id("<|user|>")] and ctx[-1] == lm.tok.token_id("<|assistant|>")
    assert cont == lm.tok.encode(" 4")

    text = "The dog sat on the log. The cat sat on the mat. 1 + 1 = 2. " * 2  # longer than the context
    ids = lm.encode(text)
    assert len(ids) > lm.max_length
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # lm_eval's disjoint windows: every token scored exactly once, after the <|eot|> prefix
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.tok.eot_id, lm.max_length, 1)]
    assert len(windows) > 1 and sum(len(cont) for _, cont in windows) == len(ids)
    expect = sum(by_hand(lm, ctx, cont)[0] for ctx, cont in windows)
    assert rolling == pytest.approx(expect, abs=1e-3)


def test_generate_until_is_greedy_and_cut_at_stop(checkpoint):
    lm = LLMForgeLM(checkpoint=str(checkpoint))
    (out,) = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": ["."], "max_gen_toks": 10}), 0)])
    ids = [lm.tok.eot_id] + lm.encode("The cat")
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    expect = lm.tok.decode(ids[len(lm.encode("The cat")) + 1:])
    expect = expect.split(".")[0]
    assert out == expect
    assert "." not in out
    # a context longer than the model's window and lm_eval's default 256-token budget still run
    long_ctx = "The dog sat on the log. " * 20
    (out,) = lm.generate_until([Instance("generate_until", {}, (long_ctx, {"until": ["\n"]}), 0)])
    assert isinstance(out, str)


def write_tasks(folder, data_dir) -> None:
    mc = [{"question": "The cat sat on the", "choices": [" mat.", " moon.", " 42"], "answer": 0},
          {"question": "1 + 1 =", "choices": [" 2", " 7", " cat"], "answer": 0},
          {"question": "The dog sat on the", "choices": [" sky", " log."], "answer": 1}]
    gen = [{"prompt": "The cat sat on the", "target": " mat"}, {"prompt": "2 + 2 =", "target": " 4"}]
    ppl = [{"text": "The cat sat on the mat."}, {"text": "def add(a, b):\n    return a + b\n"}]
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(data_dir / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(data_dir / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common.format(data_dir / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


def test_lm_eval_runs_local_tasks_with_the_llmforge_model(checkpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir, data_dir = tmp_path / "tasks", tmp_path / "data"
    tasks_dir.mkdir()
    data_dir.mkdir()
    write_tasks(tasks_dir, data_dir)
    results = simple_evaluate(model="llmforge", model_args=f"checkpoint={checkpoint},batch_size=4",
                              tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                              task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                              bootstrap_iters=0, log_samples=False)
    res = results["results"]

    # accuracy equals picking the highest-loglikelihood choice by hand
    lm = LLMForgeLM(checkpoint=str(checkpoint))
    rows = [json.loads(l) for l in (data_dir / "mc.jsonl").read_text().splitlines()]
    hits = []
    for r in rows:
        scores = [by_hand(lm, *lm.encode_pair(r["question"], c))[0] for c in r["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    assert res["tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(res["tiny_ppl"]["bits_per_byte,none"]) and res["tiny_ppl"]["bits_per_byte,none"] > 0
