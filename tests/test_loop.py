"""The one training loop: learning, exact resume, budget, bad resume."""
import dataclasses

import pytest
import torch

from llmforge.config import ModelConfig, TrainConfig
from llmforge.errors import UserError
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.train.distributed import DistContext
from llmforge.train.loop import Checkpointing, train

MODEL = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32)
# a learnable stream: token t+1 = (3 * t + 1) mod 32 with occasional noise
g = torch.Generator().manual_seed(0)
STREAM = torch.zeros(20_000, dtype=torch.long)
for i in range(1, len(STREAM)):
    STREAM[i] = (3 * STREAM[i - 1] + 1) % 32 if torch.rand((), generator=g) > 0.1 else torch.randint(0, 32, (), generator=g)


def get_batch(step, micro, ctx, B=8, T=16):
    gen = torch.Generator().manual_seed(step * 31 + micro)
    starts = torch.randint(0, len(STREAM) - T - 1, (B,), generator=gen)
    x = torch.stack([STREAM[s:s + T] for s in starts])
    y = torch.stack([STREAM[s + 1:s + T + 1] for s in starts])
    return {"input_ids": x, "targets": y}


def loss_fn(model, batch):
    _, loss = model(batch["input_ids"], targets=batch["targets"])
    return loss, {}


def run_train(tmp_path, cfg, model_cfg=MODEL, resume=False, batches=get_batch, name="run"):
    torch.manual_seed(0)
    run = RunDir(tmp_path / name)
    ckpt = Checkpointing(run.root / "ckpt", "base", model_cfg)
    summary = train(Transformer(model_cfg), cfg, run, stage="pretrain", ctx=DistContext(), get_batch=batches,
                    loss_fn=loss_fn, ckpt=ckpt, resume=resume, show_progress=False)
    return run, summary


def losses(run):
    return {r["step"]: r["loss"] for r in run.read_metrics("pretrain") if "loss" in r}


CFG = TrainConfig(batch_size=8, seq_len=16, lr=3e-3, warmup_steps=5, max_steps=30, log_every=1, ckpt_every=10,
                  eval_every=0, dtype="fp32", grad_accum=2)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_falls(tmp_path, optimizer):
    run, summary = run_train(tmp_path, dataclasses.replace(CFG, optimizer=optimizer))
    curve = losses(run)
    assert summary["steps"] == 30
    assert curve[30] < curve[1] - 1.0


@pytest.mark.parametrize("dtype,optimizer", [("fp32", "adamw"), ("bf16", "adamw"), ("fp32", "muon")])
def test_resume_after_crash_reproduces_the_uninterrupted_curve(tmp_path, dtype, optimizer):
    cfg = dataclasses.replace(CFG, dtype=dtype, optimizer=optimizer)
    full, _ = run_train(tmp_path, cfg, name="full")

    def crashing(step, micro, ctx):
        if step == 17:
            raise RuntimeError("simulated crash")
        return get_batch(step, micro, ctx)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(tmp_path, cfg, batches=crashing, name="crashed")  # last checkpoint: step 10
    resumed, summary = run_train(tmp_path, cfg, resume=True, name="crashed")
    a, b = losses(full), losses(resumed)
    assert summary["steps"] == 30
    assert all(a[s] == b[s] for s in range(11, 31)), [(s, a[s], b[s]) for s in range(11, 31) if a[s] != b[s]]


def test_resume_with_another_model_config_is_refused(tmp_path):
    run_train(tmp_path, dataclasses.replace(CFG, max_steps=3, ckpt_every=0))
    other = dataclasses.replace(MODEL, n_layer=3)
    with pytest.raises(UserError, match="different model config"):
        run_train(tmp_path, CFG, model_cfg=other, resume=True)


def test_resume_without_state_is_refused(tmp_path):
    with pytest.raises(UserError, match="no train_state"):
        run_train(tmp_path, CFG, resume=True)


def test_schedules():
    from llmforge.train.optim import lr_at
    cos = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 0.0, cos) == pytest.approx(0.1)
    assert lr_at(10, 0.0, cos) == pytest.approx(1.0)
    assert lr_at(50, 0.5, cos) == pytest.approx(0.55)
    assert lr_at(99, 1.0, cos) == pytest.approx(0.1)
    wsd = dataclasses.replace(cos, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 0.7, wsd) == pytest.approx(1.0)
    assert lr_at(50, 0.9, wsd) == pytest.approx(0.55)


def test_orthogonalize_pushes_singular_values_near_one():
    from llmforge.train.optim import orthogonalize
    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-2, 1, 96))
    for m in (g, g.T):  # wide and tall
        s = torch.linalg.svdvals(orthogonalize(m))
        assert 0.6 < float(s.min()) and float(s.max()) < 1.25, s
        # the same singular vectors: U V^T of the input, up to the iteration's looseness
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(orthogonalize(m).flatten(), (u @ vh).flatten(), 0) > 0.95


def test_orthogonalize_treats_a_batch_as_separate_matrices():
    """Muon orthogonalizes same-shape matrices as one batch: each must come out as it would alone."""
    from llmforge.train.optim import orthogonalize
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0))
    g[1] *= 100.0   # each matrix is normalised by its own norm, not the batch's
    for batch in (g, g.mT):
        alone = torch.stack([orthogonalize(m) for m in batch])
        assert torch.allclose(orthogonalize(batch), alone, atol=1e-5)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from llmforge.train.optim import Muon, build_optimizer
    model = Transformer(MODEL)
    opt = build_optimizer(model, dataclasses.replace(CFG, optimizer="muon", muon_lr=0.02), "cpu")
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    other = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "layers.0.attn.q_proj.weight" in muon and "layers.1.mlp.down_proj.weight" in muon
    assert "embed.weight" in other and not any("norm" in n for n in muon)
    assert all(g["lr_scale"] == pytest.approx(0.02 / CFG.lr) for g in opt.param_groups if g["muon"])
    # one Muon step moves a matrix by lr * sqrt(max(1, rows/cols)) * (a near-orthogonal update)
    model(torch.randint(0, 32, (2, 8)), targets=torch.randint(0, 32, (2, 8)))[1].backward()
    w = model.layers[0].mlp.gate_proj.weight   # rows 128 > cols 32: scale 2
    before = w.detach().clone()
    for g in opt.param_groups:
        g["lr"] = 0.01 if g["muon"] else 0.0
        g["weight_decay"] = 0.0
    opt.step()
    s = torch.linalg.svdvals((w.detach() - before) / 0.01)
    assert 0.6 * 2 < float(s.max()) < 1.25 * 2


def test_the_plan_pays_for_the_evaluations_within_the_minutes():
    """50 steps in 25 s (0.5 s each) of a 480 s budget, 30 s spent: 900 more steps on step time
    alone; an evaluation of 6 s every 250 steps adds 0.024 s per step and one final evaluation:
    step + (480 - 30 - 6) / 0.524 = 50 + 847."""
    from llmforge.train.distributed import DistContext
    from llmforge.train.loop import plan_steps
    ctx = DistContext()
    assert plan_steps(50, 30.0, 0.5, 480.0, 10_000, ctx) == 950
    assert plan_steps(50, 30.0, 0.5, 480.0, 10_000, ctx, eval_s=6.0, eval_every=250) == 50 + 847
    assert plan_steps(50, 30.0, 0.5, 480.0, 600, ctx) == 600          # max_steps caps the plan
    assert plan_steps(50, 500.0, 0.5, 480.0, 10_000, ctx) == 50       # over budget: stop now


@pytest.mark.slow
def test_a_minutes_budget_is_planned_into_steps_and_a_resume_keeps_the_plan(tmp_path):
    """plan_after: the minutes become a step count after the first steps (so pretraining's
    midtraining and the lr schedule follow steps); the plan is saved, so a run resumed on a
    slower machine trains the same steps with the same losses instead of planning again."""
    import time

    def timed(seconds, crash_at=None):
        def batches(step, micro, ctx):
            if step == crash_at:
                raise RuntimeError("simulated crash")
            time.sleep(seconds)
            return get_batch(step, micro, ctx)
        return batches

    cfg = dataclasses.replace(CFG, max_steps=10_000, minutes=3 / 60, plan_after=8, ckpt_every=9)
    run, summary = run_train(tmp_path, cfg, batches=timed(0.002), name="full")
    rows = run.read_metrics("pretrain")
    planned = [r["planned_steps"] for r in rows if "planned_steps" in r]
    assert len(planned) == 1 and 11 < planned[0] < 10_000 and summary["steps"] == planned[0]
    last_lr = [r["lr"] for r in rows if "lr" in r][-1]   # the schedule ends where the steps end
    assert last_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)

    cfg = dataclasses.replace(CFG, max_steps=10_000, minutes=3 / 60, plan_after=8, ckpt_every=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(tmp_path, cfg, batches=timed(0.002, crash_at=11), name="crashed")   # checkpoint at step 9
    crashed = RunDir(tmp_path / "crashed")
    first = losses(crashed)
    plan = [r["planned_steps"] for r in crashed.read_metrics("pretrain") if "planned_steps" in r][0]
    cfg = dataclasses.replace(CFG, max_steps=10_000, minutes=3 / 60, plan_after=8, ckpt_every=9)
    _, summary = run_train(tmp_path, cfg, resume=True, batches=timed(0.02), name="crashed")   # slower now
    assert summary["steps"] == plan
    again = {r["step"]: r["loss"] for r in crashed.read_metrics("pretrain") if "loss" in r and r["step"] > 9}
    assert again[10] == first[10]   # the same batches and schedule as before the crash
