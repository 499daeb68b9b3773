"""Mixture of experts (model/moe.py): the router's math on hand-computed tensors, dispatch against a
slow per-token reference, the one-expert MoE against the dense MLP, training through the one loop,
decoding through the one engine, bad configs."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from llmforge.config import ModelConfig, TrainConfig
from llmforge.errors import UserError
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.model import moe
from llmforge.model.transformer import Transformer
from llmforge.run import RunDir
from llmforge.train.checkpoint import load_model, save_checkpoint
from llmforge.train.distributed import DistContext
from llmforge.train.loop import Checkpointing, train

# three tokens, three experts; no ties anywhere
PROBS = torch.tensor([[0.50, 0.30, 0.20],
                      [0.10, 0.60, 0.30],
                      [0.25, 0.15, 0.60]])


def pairs(r: moe.Routing) -> list[tuple[int, int, float]]:
    """(expert, token, gate) of every kept pair, in dispatch order."""
    experts = torch.repeat_interleave(torch.arange(len(r.counts)), r.counts)
    return [(int(e), int(t), round(float(g), 6)) for e, t, g in zip(experts, r.tokens, r.gates)]


def test_token_choice_top2_gates_are_renormalised_and_sorted_by_expert():
    r = moe.token_choice(PROBS, top_k=2, cap=None)
    assert pairs(r) == [(0, 0, round(0.5 / 0.8, 6)), (0, 2, round(0.25 / 0.85, 6)),
                        (1, 0, round(0.3 / 0.8, 6)), (1, 1, round(0.6 / 0.9, 6)),
                        (2, 1, round(0.3 / 0.9, 6)), (2, 2, round(0.6 / 0.85, 6))]
    assert float(moe.dropped_share(r, 3)) == 0.0
    raw = moe.token_choice(PROBS, top_k=2, cap=None, renormalize=False)   # the expert-choice decoding rule
    assert [g for _, _, g in pairs(raw)] == [0.5, 0.25, 0.3, 0.6, 0.3, 0.6]


def test_capacity_keeps_each_experts_earliest_tokens_and_counts_the_dropped():
    assert moe.capacity(n_tokens=3, n_experts=3, top_k=2, factor=0.5) == 1       # ceil(0.5 * 2 * 3 / 3)
    assert moe.capacity(n_tokens=10, n_experts=4, top_k=1, factor=1.25) == 4     # ceil(3.125)
    assert moe.capacity(n_tokens=3, n_experts=1, top_k=1, factor=2.0) == 3       # never more than N
    r = moe.token_choice(PROBS, top_k=2, cap=1)
    # e0 wanted t0, t2: keeps t0; e1 wanted t0, t1: keeps t0; e2 wanted t1, t2: keeps t1. t2 is dropped.
    assert pairs(r) == [(0, 0, 0.625), (1, 0, 0.375), (2, 1, round(0.3 / 0.9, 6))]
    assert float(moe.dropped_share(r, 3)) == pytest.approx(1 / 3)


def test_expert_choice_each_expert_takes_its_top_tokens():
    probs = torch.tensor([[0.50, 0.40, 0.10], [0.30, 0.25, 0.45], [0.15, 0.35, 0.50]])
    r = moe.expert_choice(probs, cap=1)
    assert pairs(r) == [(0, 0, 0.5), (1, 0, 0.4), (2, 2, 0.5)]   # nobody takes t1
    assert float(moe.dropped_share(r, 3)) == pytest.approx(1 / 3)
    r = moe.expert_choice(probs, cap=2)
    assert pairs(r) == [(0, 0, 0.5), (0, 1, 0.3), (1, 0, 0.4), (1, 2, 0.35), (2, 2, 0.5), (2, 1, 0.45)]
    assert r.counts.tolist() == [2, 2, 2] and float(moe.dropped_share(r, 3)) == 0.0


def test_load_balance_loss_is_one_when_uniform_and_E_when_collapsed():
    E, eps = 4, 0.1
    balanced = (1 - eps) / E + eps * torch.eye(E)          # token t prefers expert t a little
    assert moe.top_k_load(balanced, 1).tolist() == [0.25] * 4
    assert float(moe.load_balance_loss(balanced, 1)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 2] = 1.0                                     # every token: expert 2, probability 1
    assert moe.top_k_load(collapsed, 1).tolist() == [0, 0, 1, 0]
    assert float(moe.load_balance_loss(collapsed, 1)) == pytest.approx(E)
    # half the tokens on expert 0 with p = 0.7 / 0.1 / 0.1 / 0.1, half on expert 1 mirrored:
    # f = (1/2, 1/2, 0, 0), P = (0.4, 0.4, 0.1, 0.1): L = 4 * (0.2 + 0.2) = 1.6
    half = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]).repeat(3, 1)
    assert float(moe.load_balance_loss(half, 1)) == pytest.approx(1.6)


def test_router_z_loss_and_entropy():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])   # logsumexp: ln 2 and ln 4 = 2 ln 2
    assert float(moe.router_z_loss(logits)) == pytest.approx((math.log(2) ** 2 + 4 * math.log(2) ** 2) / 2)
    assert float(moe.router_entropy(torch.full((5, 4), 0.25))) == pytest.approx(math.log(4))
    assert float(moe.router_entropy(torch.eye(4))) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- the layer

def layer_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64,
                moe_experts=4, moe_top_k=2, moe_d_ff=24)
    return ModelConfig(**{**base, **kw})


def reference(layer: moe.MoE, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The slow reference: token by token, expert by expert, with the capacity rule written as a loop."""
    probs = torch.softmax(layer.router(x).float(), -1)
    N, E = probs.shape
    k, cap = layer.top_k, moe.capacity(N, E, layer.top_k, layer.capacity_factor)
    take = torch.zeros(N, E)                          # gate of (token, expert), 0 = not processed
    if layer.router_kind == "expert_choice" and training:
        for e in range(E):
            for t in sorted(range(N), key=lambda t: -float(probs[t, e]))[:cap]:
                take[t, e] = probs[t, e]
    else:
        used = [0] * E
        for t in range(N):
            top = sorted(range(E), key=lambda e: -float(probs[t, e]))[:k]
            norm = sum(float(probs[t, e]) for e in top) if layer.router_kind == "token_choice" else 1.0
            for e in top:
                if layer.router_kind == "expert_choice" or not training or used[e] < cap:
                    take[t, e] = probs[t, e] / norm
                    used[e] += 1
    out = torch.zeros_like(x)
    for t in range(N):
        for e in range(E):
            if take[t, e]:
                out[t] += take[t, e] * layer.experts[e](x[t:t + 1])[0]
        if layer.shared is not None:
            out[t] += layer.shared(x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("router,shared,cf,training", [
    ("token_choice", 0, 1.25, True), ("token_choice", 0, 0.5, True), ("token_choice", 1, 0.5, False),
    ("expert_choice", 0, 1.0, True), ("expert_choice", 1, 0.5, True), ("expert_choice", 0, 1.0, False)])
def test_sorted_dispatch_equals_the_slow_reference(router, shared, cf, training):
    torch.manual_seed(0)
    layer = moe.MoE(layer_cfg(moe_router=router, moe_shared_experts=shared, moe_capacity_factor=cf))
    layer.train(training)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        got = layer(x).reshape(-1, 32)
        want = reference(layer, x.reshape(-1, 32), training)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if cf < 1 and training:  # the capacity must have bitten for the case to mean something
        assert float(moe.dropped_share(layer.route(torch.softmax(layer.router(x.reshape(-1, 32)), -1)), 26)) > 0


def test_one_expert_moe_equals_the_dense_model_with_the_same_weights():
    dense_cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
    torch.manual_seed(0)
    dense = Transformer(dense_cfg)
    sparse = Transformer(dataclasses.replace(dense_cfg, moe_experts=1, moe_top_k=1, moe_capacity_factor=1.0))
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    state.update({k: v for k, v in sparse.state_dict().items() if ".router." in k})
    sparse.load_state_dict(state)
    x = torch.randint(0, 64, (3, 20))
    for mode in (True, False):
        dense.train(mode), sparse.train(mode)
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-6, rtol=1e-6)
    assert sparse.flops_per_token() == pytest.approx(dense.flops_per_token() + 6 * 32 * 1 * 2 * 2)  # router + combine


def test_active_parameters_match_the_dense_model_by_default():
    dense = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=48, max_seq_len=64))
    sparse = Transformer(dataclasses.replace(dense.cfg, moe_experts=8, moe_top_k=2))
    router = 2 * 8 * 48
    assert sparse.cfg.expert_dim * 2 == dense.cfg.ffn_dim
    assert sparse.active_params() == dense.num_params() + router
    assert sparse.num_params() == dense.num_params() + router + 2 * 6 * 3 * 48 * sparse.cfg.expert_dim
    ec = Transformer(dataclasses.replace(sparse.cfg, moe_router="expert_choice", moe_capacity_factor=1.5))
    assert ec.active_params() == sparse.active_params() + 2 * 1 * 3 * 48 * sparse.cfg.expert_dim  # 3 experts, not 2


def test_moe_presets_keep_the_dense_presets_active_parameters():
    from llmforge.config import resolve
    for dense, sparse in (("cpu", "cpu-moe"), ("gpt2-small", "gpt2-small-moe")):
        d, s = resolve(dense).model, resolve(sparse).model
        assert s.moe_experts == 8 and d.moe_experts == 0
        assert dataclasses.replace(s, **{f.name: getattr(d, f.name) for f in dataclasses.fields(d)
                                         if f.name.startswith("moe_")}) == d   # only the MoE knobs differ
        with torch.device("meta"):
            assert Transformer(s).active_params() == Transformer(d).num_params() + s.d_model * 8 * \
                sum(s.is_moe_layer(i) for i in range(s.n_layer))   # + the routers


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,says", [
    (dict(moe_top_k=5), "moe_top_k=5 must be between 1 and model.moe_experts=4"),
    (dict(moe_top_k=0), "moe_top_k=0"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor=0.0 must be > 0"),
    (dict(moe_capacity_factor=-1.0), "moe_capacity_factor=-1.0 must be > 0"),
    (dict(moe_every=3), "moe_every=3 selects no MoE layer"),
    (dict(moe_every=0), "moe_every=0 selects no MoE layer"),
    (dict(moe_router="hash"), "moe_router='hash' is not a router"),
    (dict(moe_experts=-2), "moe_experts=-2 is negative"),
])
def test_bad_moe_config_is_one_clear_line(kw, says):
    with pytest.raises(UserError, match=None) as e:
        layer_cfg(**kw).validate()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_moe_checkpoint_loaded_with_a_dense_config_is_refused(tmp_path):
    cfg = layer_cfg()
    save_checkpoint(tmp_path / "ck", Transformer(cfg), kind="base", model_cfg=cfg)
    config = (tmp_path / "ck" / "config.json")
    config.write_text(config.read_text().replace('"moe_experts": 4', '"moe_experts": 0'))
    with pytest.raises(UserError, match="mixture-of-experts weights .* but the model config is dense"):
        load_model(tmp_path / "ck", kinds=["base"])


# ---------------------------------------------------------------- training through the loop

VOCAB = 32
g = torch.Generator().manual_seed(0)
STREAM = torch.zeros(20_000, dtype=torch.long)
for i in range(1, len(STREAM)):  # token t+1 = (3 t + 1) mod 32, with 10% noise
    STREAM[i] = (3 * STREAM[i - 1] + 1) % VOCAB if torch.rand((), generator=g) > 0.1 else torch.randint(0, VOCAB, (), generator=g)


def get_batch(step, micro, ctx, B=8, T=16):
    gen = torch.Generator().manual_seed(step * 31 + micro)
    starts = torch.randint(0, len(STREAM) - T - 1, (B,), generator=gen)
    return {"input_ids": torch.stack([STREAM[s:s + T] for s in starts]),
            "targets": torch.stack([STREAM[s + 1:s + T + 1] for s in starts])}


def loss_fn(model, batch):
    _, loss = model(batch["input_ids"], targets=batch["targets"])
    return loss, {}


def train_micro(tmp_path, **moe_kw):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32,
                      moe_experts=4, moe_top_k=1, **moe_kw)
    torch.manual_seed(0)
    run = RunDir(tmp_path / "run")
    tc = TrainConfig(batch_size=8, seq_len=16, lr=3e-3, warmup_steps=5, max_steps=80, log_every=5, ckpt_every=0,
                     eval_every=0, dtype="fp32")
    model = Transformer(cfg)
    train(model, tc, run, stage="pretrain", ctx=DistContext(), get_batch=get_batch, loss_fn=loss_fn,
          ckpt=Checkpointing(run.root / "ckpt", "base", cfg), show_progress=False)
    return model, [r for r in run.read_metrics("pretrain") if "loss" in r]


def test_micro_moe_training_lowers_loss_keeps_load_balanced_and_logs_the_router(tmp_path):
    model, recs = train_micro(tmp_path, moe_aux_coef=0.05)
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    last = recs[-1]
    for layer in (0, 1):
        load = last[f"moe_load_L{layer}"]
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
        assert max(load) <= 1.5 / 4, load
        assert 0.0 <= last[f"moe_dropped_L{layer}"] < 0.5
        assert 0.0 < last[f"moe_entropy_L{layer}"] <= math.log(4) + 1e-6
    assert 0.9 < last["moe_balance_loss"] < 1.5 and last["moe_z_loss"] > 0   # near 1: balanced
    assert all(m.records == [] for _, m in moe.moe_layers(model))   # the loop consumed every record


def test_the_load_balance_loss_alone_spreads_a_collapsed_router():
    """Gradient steps on the recorded auxiliary loss only move a router that sends every token to
    expert 0 towards the balanced load (and the z-loss alone would not)."""
    torch.manual_seed(0)
    layer = moe.MoE(layer_cfg(moe_top_k=1, moe_z_coef=0.0, moe_aux_coef=1.0))
    c = torch.nn.functional.normalize(torch.randn(32), dim=0)
    x = c + 0.3 * torch.randn(64, 32)
    with torch.no_grad():
        layer.router.weight.copy_(0.1 * torch.randn_like(layer.router.weight))
        layer.router.weight[0] = 4 * c                       # every token prefers expert 0
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        layer(x)
        aux, metrics = moe.router_losses([(0, layer)])
        first = first or metrics
        opt.zero_grad()
        aux.backward()
        opt.step()
    assert max(first["moe_load_L0"]) > 0.9 and float(first["moe_balance_loss"]) > 3.0
    assert max(metrics["moe_load_L0"]) < 0.5 and float(metrics["moe_balance_loss"]) < 1.5, metrics


# ---------------------------------------------------------------- decoding through the engine

class _NoText:
    def decode(self, ids) -> str:
        return ""

    def token_id(self, name: str) -> int:
        raise KeyError(name)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_engine_with_the_kv_cache_equals_full_recompute(router):
    torch.manual_seed(0)
    model = Transformer(layer_cfg(moe_router=router, moe_shared_experts=1, init_std=0.3)).eval()
    prompts = [[1, 5, 9, 3, 7], [2, 4, 6, 8, 10, 12, 14, 16]]
    outs = Engine(model, _NoText(), max_batch=2).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out.tokens == seq[len(prompt):]


def test_expert_choice_scores_the_batch_with_the_training_rule_only_when_asked():
    torch.manual_seed(0)
    model = Transformer(layer_cfg(moe_router="expert_choice", moe_capacity_factor=0.5)).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        decoding = model(x)
        with moe.batch_routing_at_eval(model):
            batch = model(x)
        again = model(x)
    assert not torch.allclose(decoding, batch)          # half the capacity: the rules differ
    torch.testing.assert_close(again, decoding)         # and the switch is undone


# ---------------------------------------------------------------- export and import

@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.tokenizer.bpe import Tokenizer
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 3] * 20
    return Tokenizer.train(texts, vocab_size=300)


def random_moe_checkpoint(tmp_path, tokenizer, **kw):
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, rope_theta=500.0,
                      norm_eps=1e-6, moe_experts=4, moe_top_k=2, **kw)
    torch.manual_seed(1)
    model = Transformer(cfg)
    with torch.no_grad():   # away from init: norms off 1, decisive routers and logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=cfg, tokenizer=tokenizer)
    return model.eval(), cfg


@pytest.mark.parametrize("kw,model_type", [({}, "mixtral"), ({"moe_shared_experts": 1}, "qwen2_moe"),
                                           ({"moe_every": 2, "qkv_bias": True}, "qwen2_moe")])
def test_hf_export_loads_in_transformers_with_our_logits_and_imports_back(kw, model_type, tokenizer, tmp_path):
    import json
    transformers = pytest.importorskip("transformers")
    from llmforge.interop import export_checkpoint, import_hf
    model, cfg = random_moe_checkpoint(tmp_path, tokenizer, **kw)
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(8, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_logits = model(ids)
        assert (theirs(ids).logits - ours_logits).abs().max() < 1e-4
    theirs.generation_config.eos_token_id, theirs.generation_config.pad_token_id = None, 0
    hf_tokens = theirs.generate(ids[:1], max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 24:].tolist()
    engine_tokens = Engine(model, tokenizer, max_batch=1).generate(
        [ids[0].tolist()], SamplingParams(max_tokens=12, temperature=0.0))[0].tokens
    assert engine_tokens == hf_tokens
    back, config, _ = load_model(import_hf(out, tmp_path / "imported", add_chat_tokens=False), kinds=["base"])
    same = ("moe_experts", "moe_top_k", "moe_every", "moe_shared_experts", "moe_router", "expert_dim")
    assert [getattr(back.cfg, k) for k in same] == [getattr(cfg, k) for k in same]
    with torch.no_grad():
        assert (back.eval()(ids) - ours_logits).abs().max() < 1e-6


def test_hf_import_refuses_a_learned_shared_expert_gate(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file
    from llmforge.interop import export_checkpoint, import_hf
    random_moe_checkpoint(tmp_path, tokenizer, moe_shared_experts=1)
    out = export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.0.mlp.shared_expert_gate.weight"] += 0.1
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="learned shared-expert gate"):
        import_hf(out, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_expert_choice_export_is_refused_with_one_line_and_no_output(fmt, tokenizer, tmp_path):
    from llmforge.interop import export_checkpoint
    random_moe_checkpoint(tmp_path, tokenizer, moe_router="expert_choice")
    with pytest.raises(UserError, match="routes by expert choice") as e:
        export_checkpoint(tmp_path / "ckpt", fmt, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_gguf_is_llama_cpps_mixtral_layout_read_back_tensor_by_tensor(tokenizer, tmp_path):
    gguf = pytest.importorskip("gguf")
    from llmforge.interop import export_checkpoint
    from llmforge.interop.gguf_export import unpermute_from_llama_cpp
    model, cfg = random_moe_checkpoint(tmp_path, tokenizer)
    reader = gguf.GGUFReader(str(export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")))
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    assert reader.fields["llama.feed_forward_length"].contents() == cfg.expert_dim
    tensors = {t.name: torch.from_numpy(np.asarray(t.data).copy()) for t in reader.tensors}
    state = model.state_dict()
    for i in range(cfg.n_layer):
        assert torch.equal(tensors[f"blk.{i}.ffn_gate_inp.weight"], state[f"layers.{i}.mlp.router.weight"])
        for ours, theirs in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stacked = tensors[f"blk.{i}.ffn_{theirs}_exps.weight"]
            assert stacked.shape[0] == 4
            for e in range(4):
                assert torch.equal(stacked[e], state[f"layers.{i}.mlp.experts.{e}.{ours}.weight"])
        assert torch.equal(unpermute_from_llama_cpp(tensors[f"blk.{i}.attn_q.weight"], 4),
                           state[f"layers.{i}.attn.q_proj.weight"])
    expected = {n for n in state if n != "lm_head.weight"}
    assert len(tensors) == len(expected) - cfg.n_layer * 4 * 3 + cfg.n_layer * 3   # experts stacked per layer


def test_gguf_refuses_what_the_mixtral_layout_cannot_hold(tokenizer, tmp_path):
    from llmforge.interop import export_checkpoint
    random_moe_checkpoint(tmp_path, tokenizer, moe_shared_experts=1)
    with pytest.raises(UserError, match="Mixtral layout, which has no shared experts"):
        export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_runs_the_moe_export_with_our_logits(tokenizer, tmp_path):
    """Real llama.cpp (where the llama-cpp-cffi wheel is installed; else skipped) on the f32 file."""
    pytest.importorskip("gguf")
    from test_gguf import LlamaCpp   # tests/ is on sys.path under pytest
    from llmforge.interop import export_checkpoint
    llama_cpp = LlamaCpp(tmp_path)
    model, cfg = random_moe_checkpoint(tmp_path, tokenizer)
    llm = llama_cpp.load(export_checkpoint(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32"))
    ids = [tokenizer.bos_id] + tokenizer.encode("def add(a, b):\n    return a + b  # the quick brown fox")
    theirs = torch.tensor(llama_cpp.logits(llm, ids)[:, :cfg.vocab_size], dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 2e-4
    llama_cpp.lib.llama_model_free(llm)


# ---------------------------------------------------------------- DDP

@pytest.mark.slow
def test_two_process_gloo_moe_run_matches_single_process(tmp_path):
    """torchrun, 2 processes, gloo. Dropless (capacity >= tokens) and without the load-balance loss,
    whose f_e P_e product is per rank, the 2-process run must equal the single-process one; the
    z-loss is a mean over tokens, so it averages exactly."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from llmforge.cli import main
    steps = ["--set", "pretrain.max_steps=6", "--set", "pretrain.log_every=1", "--set", "pretrain.eval_every=0",
             "--set", "pretrain.dtype=fp32", "--set", "pretrain.ckpt_every=0", "--set", "pretrain.mid_fraction=0",
             "--set", "model.moe_experts=4", "--set", "model.moe_top_k=2", "--set", "model.moe_capacity_factor=4.0",
             "--set", "model.moe_aux_coef=0.0"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["data", "prepare", "--out", str(single), "--preset", "micro"]) == 0
    shutil.copytree(single, multi)
    os.remove(multi / "metrics.jsonl")
    assert main(["pretrain", "--out", str(single), *steps, "--set", "pretrain.batch_size=16"]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "llmforge.cli", "pretrain", "--out", str(multi), *steps, "--set", "pretrain.batch_size=8"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def logged(run):
        recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
        return {r["step"]: r for r in recs if r.get("stage") == "pretrain" and "loss" in r}
    a, b = logged(single), logged(multi)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["moe_z_loss"] == pytest.approx(a[step]["moe_z_loss"], rel=1e-4), step
        assert len(b[step]["moe_load_L1"]) == 4 and sum(b[step]["moe_load_L1"]) == pytest.approx(1.0)
