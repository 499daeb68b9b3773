"""The rollout buffer (stages/rl/rollout.py): minibatches that honour batch_size / grad_accum,
safetensors round trip, the step -> rollout schedule, and every RL algorithm resuming mid-rollout
to the same weights as a run that was never interrupted."""
import os
import shutil
import signal

import pytest
import torch

from llmforge.stages.rl.rollout import RolloutBuffer, Rollouts, steps_per_rollout


def make_buffer(n=10, phase=0, width=6, acts=3):
    g = torch.Generator().manual_seed(phase)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = torch.zeros(n, acts)
    for i in range(n):
        mask[i, :1 + i % acts] = 1
    return RolloutBuffer(phase=phase, input_ids=torch.randint(0, 50, (n, width), generator=g), lengths=lengths,
                         act_pos=torch.zeros(n, acts, dtype=torch.long), act_tok=torch.ones(n, acts, dtype=torch.long),
                         act_mask=mask, rewards=torch.arange(n).float(), item_ids=torch.arange(n) * 10,
                         old_logp=torch.randn(n, acts, generator=g), advantages=torch.randn(n, acts, generator=g),
                         meta={"kl_coef": 0.1})


def test_minibatches_cover_every_row_once_per_epoch_in_batch_size_by_grad_accum():
    buf = make_buffer(n=12)
    steps = buf.minibatches(batch_size=3, grad_accum=2, seed=0, epochs=2)
    assert len(steps) == 2 * 2 == steps_per_rollout(12, 3, 2, 2)
    assert all(len(step) == 2 and all(len(m) == 3 for m in step) for step in steps)
    epoch0 = torch.cat([m for step in steps[:2] for m in step])
    epoch1 = torch.cat([m for step in steps[2:] for m in step])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()                        # reshuffled every pass
    assert [m.tolist() for s in steps for m in s] == \
        [m.tolist() for s in buf.minibatches(3, 2, seed=0, epochs=2) for m in s]   # seeded
    # a remainder wraps to the pass's first rows: every micro-batch stays full
    odd = make_buffer(n=7).minibatches(batch_size=4, grad_accum=1, seed=0, epochs=1)
    assert [len(s[0]) for s in odd] == [4, 4] and set(torch.cat([s[0] for s in odd]).tolist()) == set(range(7))
    # fewer rows than batch_size x grad_accum: one step, the rows split over the micro-batches
    small = make_buffer(n=5).minibatches(batch_size=8, grad_accum=2, seed=0, epochs=1)
    assert len(small) == 1 and [len(m) for m in small[0]] == [3, 3]


def test_batch_trims_padding_and_keeps_rows_aligned():
    buf = make_buffer(n=6)
    rows = torch.tensor([4, 1])
    b = buf.batch(rows)
    assert b["input_ids"].shape[1] == int(buf.lengths[rows].max())
    assert b["act_mask"].shape[1] == int(buf.act_mask[rows].sum(1).max())
    assert b["rewards"].tolist() == [4.0, 1.0] and b["item_ids"].tolist() == [40, 10]
    assert "values" not in b                                          # absent tensors stay absent


def test_save_load_round_trip(tmp_path):
    buf = make_buffer(n=5, phase=3)
    buf.save(tmp_path / "r.safetensors")
    back = RolloutBuffer.load(tmp_path / "r.safetensors")
    assert back.phase == 3 and back.meta == {"kl_coef": 0.1} and back.values is None
    for name in RolloutBuffer.TENSORS:
        if getattr(buf, name) is not None:
            assert torch.equal(getattr(buf, name), getattr(back, name)), name


def test_rollouts_make_each_phase_once_and_reload_it_after_a_resume(tmp_path):
    made, state = [], {"kl": 1.0}

    def make(phase, step):
        made.append((phase, step))
        state["kl"] += 1.0                  # the stage state evolves with every rollout
        return make_buffer(n=8, phase=phase)

    def schedule(resume):
        return Rollouts(tmp_path / "ro", 8, 4, 1, 2, 0, make, resume=resume,
                        get_state=lambda: dict(state), set_state=state.update)

    r = schedule(resume=False)
    assert r.S == 4                          # 2 epochs x 8 rows / 4 per step
    first = [r(step, 0)["rewards"].tolist() for step in range(6)]
    assert made == [(0, 0), (1, 4)] and state["kl"] == 3.0
    # "killed" at step 6, resumed: phase 1 is reloaded with its state, not made again
    made.clear()
    state["kl"] = -99.0
    r = schedule(resume=True)
    assert [r(step, 0)["rewards"].tolist() for step in range(4, 6)] == first[4:6]
    assert made == [] and state["kl"] == 3.0
    # resumed exactly at a phase boundary: the next rollout is made with the state of the previous
    shutil.rmtree(tmp_path / "ro")
    state["kl"] = 1.0
    r = schedule(resume=False)
    r(0, 0)
    state["kl"] = -99.0
    r = schedule(resume=True)
    r(4, 0)
    assert made[-1] == (1, 4) and state["kl"] == 3.0
    # a fresh start never reads old rollouts
    schedule(resume=False)
    assert not (tmp_path / "ro").exists()


# ---------------------------------------------------------------- resume, end to end


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A micro run dir with what the RL stages read: tokenizer, an "sft" policy, reward models and
    preference pairs. The models are untrained (small and fast); what is tested is that the
    stages are deterministic functions of their inputs, interrupted or not."""
    import json

    from llmforge.model.heads import ScalarHeadModel
    from llmforge.model.transformer import Transformer
    from llmforge.train.checkpoint import save_checkpoint
    from tests.test_alignment import make_run
    cfg, run, tok = make_run(tmp_path_factory.mktemp("resume") / "run")
    torch.manual_seed(1)
    save_checkpoint(run.ckpt("sft"), Transformer(cfg.model), kind="sft", model_cfg=cfg.model, tokenizer=tok)
    for kind in ("rm", "rm_safety"):
        save_checkpoint(run.ckpt(kind), ScalarHeadModel(Transformer(cfg.model)), kind=kind, model_cfg=cfg.model,
                        tokenizer=tok, meta={"head": "scalar", "reward_mean": 0.0, "reward_std": 1.0})
    run.prefs.mkdir(parents=True, exist_ok=True)
    pairs = [{"prompt": f"What is {a}+{a}?", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(12)]
    (run.prefs / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return cfg, run


@pytest.fixture
def parity_verifier(monkeypatch):
    """A verifier an untrained model can satisfy half the time (the parity of its response's
    length), so every algorithm has groups, winners and advantages to learn from."""
    from llmforge.tasks import TASKS
    for task in TASKS.values():
        monkeypatch.setattr(type(task), "verify",
                            lambda self, item, response: float(len(str(response)) % 2))


def _kill_at(monkeypatch, step_to_kill):
    """SIGTERM the process when the loop starts step `step_to_kill` (once): the loop finishes that
    step, saves, and exits with SystemExit, as a Ctrl-C'd / preempted job does."""
    from llmforge.train import loop
    real, fired = loop.lr_at, []

    def lr_at(step, progress, cfg):
        if step == step_to_kill and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, progress, cfg)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    return fired


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rejection", "ppo", "dpo", "grpo"])
def test_every_rl_algorithm_resumes_mid_rollout_to_the_same_result(aligned, parity_verifier, tmp_path,
                                                                  monkeypatch, algo):
    from safetensors.torch import load_file

    from llmforge.run import RunDir
    from llmforge.stages import rl as rl_stages
    cfg, base = aligned
    cfg.rl.max_steps, cfg.rl.ckpt_every, cfg.rl.eval_per_task = 4, 1, 1
    cfg.rejection.steps_per_round, cfg.rejection.prompts = 3, 8

    def fresh(name):
        shutil.copytree(base.root, tmp_path / name)
        return RunDir(tmp_path / name)

    whole = fresh("whole")
    rl_stages.run(cfg, whole, algo=algo, show_progress=False)
    broken = fresh("broken")
    # ppo / grpo: rollouts of 2 steps: killed after step 2, it resumes at step 3, inside rollout 1
    fired = _kill_at(monkeypatch, 1 if algo == "rejection" else 2)
    with pytest.raises(SystemExit):
        rl_stages.run(cfg, broken, algo=algo, show_progress=False)
    assert fired
    rl_stages.run(cfg, broken, algo=algo, show_progress=False, resume=True)
    # the trained weights (the published policy may be the initial one, chosen on held-out accuracy)
    a = load_file(str(whole.ckpt(f"rl_{algo}_train") / "model.safetensors"))
    b = load_file(str(broken.ckpt(f"rl_{algo}_train") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), algo
    init = load_file(str(base.ckpt("sft") / "model.safetensors"))
    assert any(not torch.equal(init[k], a.get(k, a.get(f"policy.{k}"))) for k in init)   # it did train
    if algo in ("ppo", "grpo"):   # rollout 1 was sampled once, by the killed run, and reloaded
        made = [r for r in broken.read_metrics(f"rl_{algo}") if r.get("rollout") == 1]
        assert len(made) == 1
    with open(whole.ckpt(f"rl_{algo}") / "config.json") as f:
        assert '"kind": "rl"' in f.read()

    def last_loss(run):
        return [r["loss"] for r in run.read_metrics(f"rl_{algo}") if "loss" in r][-1]
    assert last_loss(whole) == last_loss(broken)
