"""Alignment stages end to end on the micro preset: SFT -> reward models -> rejection / PPO /
DPO / GRPO -> eval + report, on a tiny model built here (no downloads, no data pipeline)."""
import json
import shutil

import pytest
import torch

from llmforge.config import resolve
from llmforge.errors import UserError
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.stages import chat_data, prefs, reward, sft
from llmforge.stages import rl as rl_stages
from llmforge.stages.rl.rewards import CombinedReward
from llmforge.stages.rl.rollout import gather_actions, rollout_batch
from llmforge.tasks import TASKS
from llmforge.tokenizer.bpe import Tokenizer
from llmforge.tokenizer.chat import render_text
from llmforge.train.checkpoint import load_run_checkpoint, save_checkpoint


def make_run(root, vocab_size=512):
    """A run directory with a tokenizer and a (randomly initialized) base checkpoint."""
    cfg = resolve("micro")
    run = RunDir(root).create()
    texts = [render_text(i.conversation) for t in TASKS.values() for i in t.train_items(200)]
    tok = Tokenizer.train(texts, vocab_size=vocab_size)
    tok.save(run.tokenizer)
    cfg.model.vocab_size = 64 * -(-tok.vocab_size // 64)
    torch.manual_seed(0)
    save_checkpoint(run.ckpt("base"), Transformer(cfg.model), kind="base", model_cfg=cfg.model, tokenizer=tok)
    return cfg, run, tok


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    cfg, run, tok = make_run(tmp_path_factory.mktemp("align") / "run")
    sft.run(cfg, run, show_progress=False)
    reward.run(cfg, run, show_progress=False)
    for algo in rl_stages.ALGOS:
        rl_stages.run(cfg, run, algo=algo, show_progress=False)
    from llmforge.stages import evaluation as eval_stage
    ev = eval_stage.run(cfg, run, show_progress=False)
    return cfg, run, tok, ev


@pytest.mark.slow
def test_micro_alignment_end_to_end(pipeline):
    cfg, run, tok, ev = pipeline
    m = run.read_metrics()
    # SFT: the assistant-only loss falls and the SFT model beats the few-shot base model
    losses = [r["loss"] for r in m if r["stage"] == "sft" and "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    acc = {name: r["tasks"]["mean"]["accuracy"] for name, r in ev["models"].items()}
    assert acc["sft"] > acc["base"]
    # reward models: better than chance on held-out pairs, normalized on the reference set
    for name in ("rm", "rm_safety"):
        config = json.loads((run.ckpt(name) / "config.json").read_text())
        assert config["heldout_acc"] > 0.6, (name, config["heldout_acc"])
        assert config["reward_std"] > 0
        # accuracy per pair source on held-out pairs, in the checkpoint's meta and in metrics.jsonl
        assert all(f"acc_{s}" in config for s in ("form", "helpfulness", "verifier")), config
        logged = [r for r in m if r["stage"] == name and r.get("event") == "normalized"][-1]
        assert logged["acc_form"] == config["acc_form"] and "bon_verified_pick" in logged
    assert "false_refusal" in json.loads((run.ckpt("rm_safety") / "config.json").read_text())
    # every RL algorithm logs reward, KL, length, entropy and verified accuracy, and saves a policy
    for algo in rl_stages.ALGOS:
        stage = f"rl_{algo}"
        done = [r for r in m if r["stage"] == stage and r.get("event") == "done"][-1]
        for key in ("acc_mean", "eval_kl", "eval_length", "eval_entropy"):
            assert key in done and done[key] == done[key], (stage, key)
        assert abs(done["eval_kl"]) < 10
        assert load_run_checkpoint(run, stage, ("rl",), tok, "")[1]["kind"] == "rl"
    rollouts = [r for r in m if r["stage"] == "rl_ppo" and "rollout" in r]
    assert len(rollouts) >= 2 and all("kl" in r and "reward" in r for r in rollouts)
    rounds = [r for r in m if r["stage"] == "rl_rejection" and "round" in r]
    assert len(rounds) == cfg.rejection.rounds and all(r["reward_max"] >= r["reward_median"] for r in rounds)
    # arena: the SFT model out-rates the base model; the report has its tables and plots
    ratings = {r["model"]: r["rating"] for r in ev["arena"]}
    assert ratings["sft"] > ratings["base"]
    report = run.report.read_text()
    assert "## Stages" in report and "## Arena" in report and "## Targets" in report
    for png in ("loss.png", "rl.png", "accuracy.png", "arena.png"):
        assert (run.plots / png).stat().st_size > 1000


def test_identical_pair_and_bad_lines_are_user_errors(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "user"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": "4"}) + "\n")
    with pytest.raises(UserError, match=r"prefs.jsonl:2: chosen and rejected are identical"):
        prefs.load_pairs(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"prefs.jsonl:2: not valid JSON"):
        prefs.load_pairs(path)
    path.write_text(json.dumps(good) + "\n")
    pair = prefs.load_pairs(path)[0]
    assert pair["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}]


def test_wrong_checkpoint_kind_and_tokenizer_are_user_errors(tmp_path):
    cfg, run, tok = make_run(tmp_path / "run", vocab_size=300)
    with pytest.raises(UserError, match="missing; run `llmforge sft"):
        rl_stages.run(cfg, run, algo="ppo")      # no ckpt/sft yet
    # SFT needs a base checkpoint; an "rm" checkpoint where a policy is expected is refused
    shutil.copytree(run.ckpt("base"), run.ckpt("sft"))
    cfg_json = json.loads((run.ckpt("sft") / "config.json").read_text())
    (run.ckpt("sft") / "config.json").write_text(json.dumps({**cfg_json, "kind": "rm"}))
    with pytest.raises(UserError, match="'rm' checkpoint"):
        load_run_checkpoint(run, "sft", ("sft", "rl"), tok, "")
    other = Tokenizer.train(["completely different text " * 50], vocab_size=300)
    other.save(run.tokenizer)
    with pytest.raises(UserError, match="different tokenizer"):
        load_run_checkpoint(run, "base", ("base",), Tokenizer.load(run.tokenizer), "")
    with pytest.raises(UserError, match="unknown RL algorithm"):
        rl_stages.run(cfg, run, algo="reinforce")


def test_sft_packing_keeps_conversations_whole():
    seqs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1]), (list(range(10, 20)), [1] * 10)]
    rows, masks, truncated = chat_data.pack(seqs, width=6, pad_id=0, packing=True)
    assert rows.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15]]
    assert masks.tolist() == [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0], [1] * 6]
    assert truncated == 1
    rows, _, _ = chat_data.pack(seqs, width=6, pad_id=0, packing=False)
    assert len(rows) == 4


def test_chat_rows_are_drawn_without_replacement_and_reproducibly():
    size, per_batch = 10, 3
    stream = torch.cat([chat_data.epoch_order(size, b * per_batch, per_batch, seed=5) for b in range(10)])
    for epoch in range(3):   # every epoch is a permutation, even where a batch straddles two epochs
        assert sorted(stream[epoch * size:(epoch + 1) * size].tolist()) == list(range(size))
    assert stream[:size].tolist() != stream[size:2 * size].tolist()   # each epoch in its own order
    assert chat_data.epoch_order(size, 7, 6, seed=5).tolist() == stream[7:13].tolist()   # resume = same rows
    assert chat_data.epoch_order(size, 0, size, seed=6).tolist() != stream[:size].tolist()


def test_text_share_holds_over_batches_and_chat_rows_follow_on():
    class Text:   # every text row is all -1, so it is told apart from chat rows
        def sample_batch(self, n, seq_len, g):
            return torch.full((n, seq_len), -1), torch.full((n, seq_len), -1)

    class Chat:
        ids = torch.arange(40)[:, None].expand(40, 5).clone()
        masks = torch.ones(40, 5)

        def __len__(self):
            return 40

    def batch(draw, share):
        return chat_data.mixed_batch(torch.Generator(), 8, slice(0, 8), 4, Chat(), Text(), share, draw=draw, seed=3)

    for share, text_rows in ((0.15, 12), (0.2, 16), (0.25, 20)):   # of 80 rows; per-batch rounding gave 10, 20, 20
        batches = [batch(d, share)["input_ids"] for d in range(10)]
        assert sum(int((b[:, 0] == -1).sum()) for b in batches) == text_rows
        chat_rows = torch.cat([b[b[:, 0] != -1, 0] for b in batches])
        assert sorted(chat_rows[:40].tolist()) == list(range(40))   # the first epoch: every row once
        assert chat_rows.tolist() == chat_data.epoch_order(40, 0, 80 - text_rows, seed=3).tolist()   # no gap


def test_rollout_batch_keeps_only_sampled_tokens_as_actions():
    from llmforge.eval.tasks import Sample
    from llmforge.infer.engine import Completion
    # prompt [1, 2, 3]; the model wrote 10, 11 (a tool call), the engine inserted 20, 21, the model wrote 12
    completion = Completion(prompt_len=3, tokens=[10, 11, 20, 21, 12], generated=[True, True, False, False, True])
    batch = rollout_batch([Sample(None, [1, 2, 3], completion, [], 0.0)], pad_id=0, max_len=64)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 21, 12]]
    assert batch["act_pos"].tolist() == [[2, 3, 6]]          # logits at these positions predict the actions
    assert batch["act_tok"].tolist() == [[10, 11, 12]]
    assert batch["act_mask"].tolist() == [[1.0, 1.0, 1.0]]
    logits = torch.randn(1, 8, 30)
    logp, _ = gather_actions(logits, batch)
    expected = torch.log_softmax(logits[0, [2, 3, 6]], -1)[torch.arange(3), torch.tensor([10, 11, 12])]
    assert torch.allclose(logp[0], expected)


def test_combined_reward_routes_like_llama2():
    class ConstantRM(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.tensor(values)
            self.trunk = type("T", (), {"cfg": type("C", (), {"max_seq_len": 16})()})()

        def score_last(self, idx, lengths):
            return self.values[:len(idx)]

    helpful = ConstantRM([1.0, 2.0, 3.0])
    safety = ConstantRM([-0.5, -5.0, 0.5])   # sigmoid(-5) < 0.15: unsafe whatever the prompt
    reward = CombinedReward(helpful, {}, safety, {}, threshold=0.15)
    out = reward([[1], [1], [1]], safety_relevant=[True, False, False])
    assert out.tolist() == [-0.5, -5.0, 3.0]
    normalized = CombinedReward(helpful, {"reward_mean": 2.0, "reward_std": 0.5}, None, None)
    assert normalized([[1], [1], [1]], [False] * 3).tolist() == [-2.0, 0.0, 2.0]


def test_initial_policy_evaluation_is_memoised_per_weights(tmp_path, monkeypatch):
    """The RL stages start from the same SFT weights: the second one reads the first's
    validation answer (no generation), recomputes only the reward models' score, and a policy
    with other weights is evaluated afresh."""
    from llmforge.eval import tasks as task_eval
    from llmforge.stages.rl.evaluate import policy_eval
    cfg, run, tok = make_run(tmp_path / "run", vocab_size=300)
    policy = load_run_checkpoint(run, "base", ("base",), tok, "")[0].eval()
    names = ["addsub", "sort_numbers"]
    calls = {"n": 0}
    real_sample = task_eval.sample

    def counting_sample(*args, **kwargs):
        calls["n"] += 1
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(task_eval, "sample", counting_sample)

    def reward(seqs, safety):   # a stand-in reward model: longer sequences score higher
        return torch.tensor([len(s) / 100 for s in seqs])

    fresh_scored, memo_scored = [], []
    fresh = policy_eval(policy, policy, tok, names, 4, 8, seed=3, reward=reward, scored=fresh_scored)
    first = policy_eval(policy, policy, tok, names, 4, 8, seed=3, scored=memo_scored, memo=run)
    assert calls["n"] == 4 and len(list((run.root / "rl_initial_eval").glob("*.json"))) == 1
    again_scored = []
    again = policy_eval(policy, policy, tok, names, 4, 8, seed=3, reward=reward, scored=again_scored, memo=run)
    assert calls["n"] == 4                                     # read back, nothing generated
    assert again == fresh and memo_scored == again_scored == fresh_scored and "eval_rm_reward" not in first
    with torch.no_grad():
        policy.lm_head.weight[0, 0] += 1.0
    policy_eval(policy, policy, tok, names, 4, 8, seed=3, memo=run)
    assert calls["n"] == 6 and len(list((run.root / "rl_initial_eval").glob("*.json"))) == 2


def test_each_task_answers_within_its_own_budget(tmp_path):
    """An answer is cut at its task's budget (Task.max_new_tokens), under the caller's ceiling:
    a rambling model spends 64 tokens on a sum, 96 on a Python look-up (tool code, then the
    answer), and never more than the ceiling."""
    from llmforge.eval import tasks as task_eval
    from llmforge.tasks import get_task
    cfg, run, tok = make_run(tmp_path / "run", vocab_size=300)
    policy = load_run_checkpoint(run, "base", ("base",), tok, "")[0].eval()
    assert get_task("python_doc").max_new_tokens > get_task("addsub").max_new_tokens
    items = [i for name in ("addsub", "python_doc") for i in get_task(name).heldout_items(3)]
    for ceiling in (200, 40):
        for row in task_eval.sample(policy, tok, items, temperature=1.0, max_tokens=ceiling, seed=1):
            budget = min(ceiling, get_task(row[0].item.task).max_new_tokens)
            assert row[0].completion.n_generated <= budget
