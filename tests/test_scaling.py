"""`llmforge scaling`: the fits recover known exponents from synthetic losses of a known
L(N, D) (both approaches), the plan picks the known optimum, and a micro sweep runs end to
end through the command line and skips its finished points when run again.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_scaling.py
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from llmforge.cli import main
from llmforge.config import ModelConfig
from llmforge.scaling import fit, plan
from llmforge.scaling.config import ScalingConfig
from llmforge.scaling.sweep import param_counts, shape

# a Chinchilla-like law (Hoffmann et al.'s fitted values, rounded): a = β/(α+β) ≈ 0.45
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def law(n, d):
    return TRUE["E"] + TRUE["A"] / np.power(n, TRUE["alpha"]) + TRUE["B"] / np.power(d, TRUE["beta"])


def true_optimum(c):
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    g = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    return g * (c / 6) ** TRUE_A


def synthetic_records(noise=0.003, span=4.0, sizes=7, seed=0):
    """IsoFLOP curves centred on each budget's true optimum, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    out = []
    for c in (1e17, 1e18, 1e19, 1e20):
        for n in true_optimum(c) * np.geomspace(1 / span, span, sizes):
            d = c / (6 * n)
            loss = float(law(n, d) * np.exp(rng.normal(0, noise)))
            out.append({"unit": "flops", "budget": c, "params": float(n), "params_no_embed": float(n) * 0.8,
                        "tokens": d, "flops": c, "val_loss": loss, "val_bpb": loss * 0.9, "tokens_per_s": 1e4,
                        "model": {}, "settings": {}})
    return out


def test_approach3_recovers_the_known_law_with_intervals():
    recs = synthetic_records()
    p = fit.approach3([r["params"] for r in recs], [r["tokens"] for r in recs], [r["val_loss"] for r in recs],
                      bootstrap=40, seed=1)
    assert p["ok"]
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.03 and abs(p["beta"] - TRUE["beta"]) < 0.03
    assert abs(p["a"] - TRUE_A) < 0.02 and abs(p["E"] - TRUE["E"]) < 0.1
    assert p["rms_rel_error"] < 0.01
    for key, true in (("alpha", TRUE["alpha"]), ("beta", TRUE["beta"]), ("a", TRUE_A)):
        lo, hi = p["ci"][key]
        assert lo <= true <= hi, (key, lo, hi)


def test_approach3_noise_free_is_exact():
    recs = synthetic_records(noise=0.0)
    p = fit.approach3([r["params"] for r in recs], [r["tokens"] for r in recs], [r["val_loss"] for r in recs])
    assert abs(p["alpha"] - TRUE["alpha"]) < 1e-3 and abs(p["beta"] - TRUE["beta"]) < 1e-3


def test_approach2_recovers_the_exponents_and_reports_grid_width():
    recs = synthetic_records()
    p = fit.approach2(recs, bootstrap=40, seed=1)
    assert p["ok"] and all(c["ok"] for c in p["curves"])
    assert abs(p["a"] - TRUE_A) < 0.03 and abs(p["b"] - (1 - TRUE_A)) < 0.03
    lo, hi = p["ci"]["a"]
    assert lo <= TRUE_A <= hi
    for c in p["curves"]:  # each vertex near that budget's true N_opt
        assert abs(np.log(c["n_opt"] / true_optimum(c["budget"]))) < 0.15
    g = p["grid_width"]
    assert g["delta_a"] is not None and abs(g["delta_a"]) < 0.05 and "parabola" in g["note"]


def test_approach2_flags_a_curve_whose_minimum_is_off_the_grid():
    recs = [r for r in synthetic_records(noise=0.0) if r["budget"] != 1e17]
    c = 1e17  # sizes all far above the optimum: the vertex is not bracketed
    for n in true_optimum(c) * np.geomspace(8, 64, 4):
        recs.append({**recs[0], "budget": c, "flops": c, "params": float(n), "tokens": c / (6 * n),
                     "val_loss": float(law(n, c / (6 * n)))})
    p = fit.approach2(recs)
    bad = [cv for cv in p["curves"] if cv["budget"] == c][0]
    assert not bad["ok"] and "smaller" in bad["reason"]
    assert p["ok"] and abs(p["a"] - TRUE_A) < 0.03  # the other three curves still fit


# ------------------------------------------------------------------ plan

RULE = {"model": dataclasses.asdict(ModelConfig(vocab_size=4096, max_seq_len=256)), "aspect": 64, "head_dim": 64,
        "kv_ratio": 4, "batch_size": 16, "seq_len": 256, "grad_accum": 1, "lr": 2e-3, "warmup_steps": 50}


def n_of_depth(depth):
    base = ModelConfig(**RULE["model"])
    return param_counts(shape(depth, ScalingConfig(), base))["params"]


def law_fit():
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    g = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    return {"approach3": {**TRUE, "ok": True, "a": TRUE_A, "b": 1 - TRUE_A, "G": g}, "rule": RULE,
            "bpb_per_nat": 0.9}


def test_shape_rule():
    sc = ScalingConfig()
    base = ModelConfig(vocab_size=4096)
    for depth in range(1, 13):
        mc = shape(depth, sc, base)
        mc.validate()
        assert mc.d_model == 64 * depth and mc.n_head % mc.n_kv_head == 0
    assert shape(8, sc, base).n_head == 8 and shape(8, sc, base).n_kv_head == 2
    counts = param_counts(shape(2, sc, base))
    assert counts["params"] - counts["params_no_embed"] == 4096 * 128  # tied: one embedding matrix
    from llmforge.model.transformer import Transformer
    for mc in (shape(3, sc, ModelConfig(vocab_size=300)), ModelConfig(vocab_size=97, d_model=48, n_head=6,
                                                                     n_kv_head=3, qkv_bias=True,
                                                                     tie_embeddings=False),
               ModelConfig(vocab_size=97, d_model=48, n_layer=3, smear_layers=2, qk_norm=True)):
        assert param_counts(mc)["params"] == Transformer(mc).num_params()


@pytest.mark.parametrize("depth", [2, 4])
def test_plan_picks_the_known_optimum(depth):
    f = law_fit()
    n_target = n_of_depth(depth)
    # the budget whose continuous optimum N_opt(C) is exactly this depth's N
    c = 6 * (n_target / f["approach3"]["G"]) ** (1 / TRUE_A)
    p = plan.plan(f, [[n_of_depth(1), 1e5], [n_of_depth(8), 1e3]], flops=c)
    assert p["shape"]["n_layer"] == depth
    assert p["params"] == n_target
    assert abs(p["tokens"] - c / (6 * n_target)) / p["tokens"] < 1e-6
    assert abs(p["predicted_loss"] - law(n_target, c / (6 * n_target))) < 1e-9
    assert abs(p["predicted_bpb"] - 0.9 * p["predicted_loss"]) < 1e-9
    # the same budget as minutes on a machine of constant FLOP/s: tokens/s = F / (6 N)
    flops_per_s = 1e9
    throughput = [[n_of_depth(k), flops_per_s / (6 * n_of_depth(k))] for k in (1, 3, 6, 10)]
    q = plan.plan(f, throughput, minutes=c / flops_per_s / 60)
    assert q["shape"]["n_layer"] == depth
    assert abs(q["minutes"] - c / flops_per_s / 60) / q["minutes"] < 1e-6
    assert any(o == f"model.n_layer={depth}" for o in q["overrides"])


def test_plan_prefers_smaller_models_when_they_run_faster():
    """Small matmuls on a CPU: tokens/s falling faster than 1/N moves the time-optimal model down."""
    f = law_fit()
    c = 6 * (n_of_depth(4) / f["approach3"]["G"]) ** (1 / TRUE_A)
    depths = (1, 2, 4, 8)
    fair = [[n_of_depth(k), 1e9 / (6 * n_of_depth(k))] for k in depths]
    skewed = [[n, t * (n / n_of_depth(4)) ** -0.5] for n, t in fair]  # equal at depth 4, slower above
    assert plan.plan(f, skewed, minutes=c / 1e9 / 60)["params"] < plan.plan(f, fair, minutes=c / 1e9 / 60)["params"]


def test_plan_rejects_bad_input():
    from llmforge.errors import UserError
    with pytest.raises(UserError, match="exactly one"):
        plan.plan(law_fit(), [[1e6, 1e4]])
    with pytest.raises(UserError, match="positive"):
        plan.plan(law_fit(), [[1e6, 1e4]], minutes=-1)
    with pytest.raises(UserError, match="Approach 3"):
        plan.plan({"approach3": {"ok": False, "reason": "x"}, "rule": RULE}, [[1e6, 1e4]], minutes=1)


# ------------------------------------------------------------------ through the command line

def cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_and_plan_commands_on_a_recorded_sweep(tmp_path, capsys):
    """fit + plan through the CLI on a scaling.jsonl of synthetic points with real shapes."""
    run = tmp_path / "run"
    (run / "scaling").mkdir(parents=True)
    rng = np.random.default_rng(0)
    settings = {k: RULE[k] for k in ("aspect", "head_dim", "kv_ratio", "batch_size", "seq_len", "lr", "warmup_steps")}
    lines = []
    for c in (1e13, 3e13, 1e14):
        for depth in (1, 2, 3, 4, 6, 8):
            n = n_of_depth(depth)
            d = c / (6 * n)
            loss = float(law(n, d) * np.exp(rng.normal(0, 0.002)))
            lines.append(json.dumps({"id": f"C{c:g}_L{depth}", "unit": "flops", "budget": c, "depth": depth,
                                     "params": n, "params_no_embed": n - 4096 * 64 * depth, "tokens": d,
                                     "flops": c, "val_loss": loss, "val_bpb": 0.9 * loss,
                                     "tokens_per_s": 1e9 / (6 * n), "model": RULE["model"], "settings": settings}))
    (run / "scaling" / "scaling.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = cli(capsys, "scaling", "fit", "--out", run, "--set", "scaling.bootstrap=20")
    assert code == 0, err
    assert "Approach 2" in out and "Approach 3" in out and "N: " in out and "grid width" in out
    result = json.loads((run / "scaling" / "fit.json").read_text())
    assert result["params_used"] == "params" and abs(result["approach3"]["a"] - TRUE_A) < 0.05
    assert result["approach3"]["ci"]["alpha"] is not None
    assert (run / "plots" / "scaling_isoflop.png").stat().st_size > 0
    assert (run / "plots" / "scaling_frontier.png").stat().st_size > 0
    code, out, err = cli(capsys, "scaling", "plan", "--out", run, "--minutes", "10")
    assert code == 0, err
    assert "predicted held-out loss" in out and "llmforge pretrain --out RUN --set model.n_layer=" in out
    code, out, err = cli(capsys, "scaling", "plan", "--out", tmp_path / "empty", "--flops", "1e15")
    assert code == 2 and "scaling fit" in err


@pytest.mark.parametrize("override,named", [("scaling.unit=hours", "scaling.unit"),
                                             ("scaling.budgets=3e12", "scaling.budgets"),
                                             ("scaling.depths=[0,2]", "scaling.depths")])
def test_sweep_rejects_bad_settings(tmp_path, capsys, override, named):
    code, _, err = cli(capsys, "scaling", "sweep", "--out", tmp_path / "run", "--set", override)
    assert code == 2 and named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.toml").exists()  # a refused config is not recorded


MICRO = ["--preset", "micro", "--set", "tokenizer.vocab_size=300", "--set", "model.max_seq_len=32",
         "--set", "pretrain.batch_size=4", "--set", "pretrain.seq_len=32", "--set", "pretrain.eval_batches=2",
         "--set", "pretrain.warmup_steps=2"]
SWEEP = ["--set", "scaling.budgets=[1e9,2e9]", "--set", "scaling.depths=[1,2]", "--set", "scaling.aspect=32",
         "--set", "scaling.head_dim=16", "--set", "scaling.min_steps=5", "--set", "scaling.bootstrap=10"]


def test_micro_sweep_end_to_end_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    sources = tmp_path / "pydoc.toml"
    sources.write_text('[[data.sources]]\nname = "pydoc"\nkind = "pydoc"\nmax_docs = 30\n')
    assert main(["data", "prepare", "--out", str(run), *MICRO, "--config", str(sources)]) == 0
    code, out, err = cli(capsys, "scaling", "sweep", "--out", run, *SWEEP)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "scaling" / "scaling.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["C1e09_L1", "C1e09_L2", "C2e09_L1", "C2e09_L2"]
    for r in records:
        assert r["params"] > r["params_no_embed"] > 0 and r["tokens"] == r["steps"] * 4 * 32
        assert r["flops"] == 6 * r["params"] * r["tokens"] and abs(r["flops"] / r["budget"] - 1) < 0.1
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0 and np.isfinite(r["val_loss"]) and r["val_bpb"] > 0
    by_id = {r["id"]: r for r in records}
    assert by_id["C2e09_L1"]["val_loss"] < by_id["C1e09_L1"]["val_loss"]  # more compute, lower loss
    assert (run / "plots" / "scaling_isoflop.png").is_file() and (run / "plots" / "scaling_frontier.png").is_file()
    assert not (run / "ckpt").exists()                                      # points stay in their folders
    metrics = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    assert '"stage": "scaling"' not in metrics
    assert not any((run / "scaling" / "points").glob("*/ckpt"))                   # weights not kept by default

    before = (run / "scaling" / "scaling.jsonl").read_text()
    code, out, err = cli(capsys, "scaling", "sweep", "--out", run, *SWEEP)
    assert code == 0, err
    assert "4 done, 0 to train" in out
    assert (run / "scaling" / "scaling.jsonl").read_text() == before

    code, out, err = cli(capsys, "scaling", "sweep", "--out", run, *SWEEP, "--set", "pretrain.lr=1e-3")
    assert code == 2 and "other settings (lr)" in err

    code, out, err = cli(capsys, "scaling", "fit", "--out", run, *SWEEP)  # 4 points: reported, not fitted
    assert code == 0, err
    assert "not fitted" in out and (run / "scaling" / "fit.json").is_file()


def test_a_recorded_point_survives_a_new_model_knob_at_its_default():
    from llmforge.scaling.sweep import same_model
    now = dataclasses.asdict(ModelConfig(n_layer=2, d_model=96))
    recorded = {k: v for k, v in now.items() if k != "qk_norm"}      # written before the knob existed
    assert same_model(recorded, now)
    assert not same_model(recorded, {**now, "qk_norm": True})        # the knob in use: another model
    assert not same_model({**recorded, "n_layer": 3}, now)
    assert not same_model({**now, "retired_knob": 1}, now)
