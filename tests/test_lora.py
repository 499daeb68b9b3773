"""LoRA: exact at init, trains only adapters, merge/unmerge round-trips, adapters saved alone and
refused on another base, bf16 base, a clear error for 8/4-bit where bitsandbytes cannot run."""
from __future__ import annotations

import copy

import pytest
import torch

from llmforge.config import ModelConfig, SFTConfig
from llmforge.errors import UserError
from llmforge.model.heads import ScalarHeadModel
from llmforge.model.lora import (LoRALinear, add_lora, apply_lora, load_adapter, load_lora_checkpoint_into,
                                 lora_meta, lora_state_dict, merge_lora, save_adapter, set_merged,
                                 trainable_parameters)
from llmforge.model.transformer import Transformer
from llmforge.train.checkpoint import load_model, load_weights, save_checkpoint



CFG = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32, qkv_bias=True)


def base_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def train_adapters(model, steps: int = 5) -> list[float]:
    """A few AdamW steps on a next-token loss; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(2)
    losses = []
    model.train()
    for _ in range(steps):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_forward_equals_base_at_init_and_only_adapters_train():
    base = base_model()
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        assert torch.equal(model(ids()), base(ids()))
    trainable, total = trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    # 7 Linears per layer, each r * (in + out)
    d, kv, f = CFG.d_model, CFG.n_kv_head * CFG.head_dim, CFG.ffn_dim
    per_layer = 4 * ((d + d) * 2 + (d + kv) * 2 + 2 * (d + f) + (f + d))
    assert trainable == CFG.n_layer * per_layer
    assert total == base.num_params() + trainable

    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    losses = train_adapters(model)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base never moves


def test_merge_unmerge_round_trip_and_merge_lora_gives_plain_model(tmp_path):
    base = base_model()
    model = add_lora(copy.deepcopy(base), rank=4, alpha=16, targets="q_proj,v_proj,down_proj")
    train_adapters(model)
    model.eval()
    original_w = model.layers[0].attn.q_proj.weight.clone()
    with torch.no_grad():
        y = model(ids())
        assert not torch.allclose(y, base(ids()), atol=1e-3)  # training changed the function
        set_merged(model, True)
        assert not torch.equal(model.layers[0].attn.q_proj.weight, original_w)
        assert torch.allclose(model(ids()), y, atol=1e-5)
        set_merged(model, False)
        assert torch.allclose(model.layers[0].attn.q_proj.weight, original_w, atol=1e-6)
        assert torch.allclose(model(ids()), y, atol=1e-6)

    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    save_checkpoint(tmp_path / "ckpt", merged, kind="sft", model_cfg=CFG)
    plain, _, _ = load_model(tmp_path / "ckpt")
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids()), y, atol=1e-5)


def test_adapter_saved_alone_and_refused_on_another_base(tmp_path):
    base = base_model()
    model = add_lora(copy.deepcopy(base), rank=2, alpha=4, targets="q_proj,v_proj")
    train_adapters(model)
    model.eval()
    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter.json").is_file()
    adapter_bytes = (folder / "adapter.safetensors").stat().st_size
    assert adapter_bytes < 0.25 * 4 * base.num_params()  # a small file next to the fp32 base

    restored = load_adapter(copy.deepcopy(base), folder)
    with torch.no_grad():
        assert torch.equal(restored(ids()), model(ids()))
    assert lora_meta(restored)["base_hash"] == lora_meta(model)["base_hash"]

    with pytest.raises(UserError, match="trained on base weights"):
        load_adapter(base_model(seed=1), folder)
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_lora_checkpoint_written_by_the_loop_loads_as_plain_model(tmp_path):
    model = add_lora(base_model(), rank=4, alpha=8, targets="q_proj,v_proj")
    train_adapters(model, steps=2)
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, kind="sft", model_cfg=CFG, meta={"lora": lora_meta(model)})
    weights = load_weights(tmp_path / "ckpt")
    assert any(".lora_A" in k for k in weights)
    plain = load_lora_checkpoint_into(Transformer(CFG).eval(), weights, lora_meta(model))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(ids()), model(ids()), atol=1e-5)


def test_apply_lora_reads_train_config_and_keeps_reward_head_trainable():
    cfg = SFTConfig()
    assert apply_lora(base_model(), cfg).num_params(trainable_only=True) == base_model().num_params()  # rank 0
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = 8, 16.0, "q_proj,k_proj"
    rm = apply_lora(ScalarHeadModel(base_model()), cfg)
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= names
    assert {n for n in names if not n.startswith("head.")} == {
        f"trunk.layers.{i}.attn.{m}.lora_{ab}" for i in range(CFG.n_layer) for m in ("q_proj", "k_proj")
        for ab in "AB"}
    assert len(lora_state_dict(rm)) == 2 * 2 * CFG.n_layer


def test_bf16_base_halves_frozen_weights_and_still_trains():
    base = base_model()
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8, targets="q_proj,v_proj", base_dtype="bf16")
    q = model.layers[0].attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # non-targets held in bf16 too
    with torch.no_grad():
        assert torch.allclose(model(ids()), base(ids()), atol=2e-2)
    losses = train_adapters(model)
    assert losses[-1] < losses[0]
    merged = merge_lora(model)
    assert merged.layers[0].attn.q_proj.weight.dtype == torch.float32


def test_bad_settings_are_clear_errors():
    with pytest.raises(UserError, match="unknown module name"):
        add_lora(base_model(), rank=4, targets="qproj")
    with pytest.raises(UserError, match="lm_head"):
        add_lora(base_model(), rank=4, targets="lm_head")  # tied to the embedding
    with pytest.raises(UserError, match="already has LoRA"):
        add_lora(add_lora(base_model(), rank=2), rank=2)
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = True
    except ImportError:
        has_bnb = False
    if not has_bnb or not torch.cuda.is_available():
        for kind in ("int8", "nf4"):
            with pytest.raises(UserError, match="bitsandbytes|CUDA"):
                add_lora(base_model(), rank=4, base_dtype=kind)


def test_lora_through_the_training_loop_saves_resumes_and_loads_merged(tmp_path):
    """The stage recipe from lora.py's docstring, through train/loop.py."""
    from llmforge.interop.hf import load_policy
    from llmforge.run import RunDir
    from llmforge.train.distributed import DistContext
    from llmforge.train.loop import Checkpointing, train

    cfg = SFTConfig(batch_size=2, seq_len=15, max_steps=4, warmup_steps=1, eval_every=0, ckpt_every=2,
                    log_every=1, dtype="fp32", lr=1e-2, lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj")
    run = RunDir(tmp_path / "run").create()
    x = ids(3)

    def get_batch(step, micro, ctx):
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def loss_fn(model, batch):
        _, loss = model(batch["input_ids"], targets=batch["targets"])
        return loss, {}

    def run_loop(resume: bool):
        model = apply_lora(base_model(), cfg)
        ck = Checkpointing(run.ckpt("sft"), "sft", CFG, None, {"lora": lora_meta(model)})
        train(model, cfg, run, stage="sft", ctx=DistContext(), get_batch=get_batch, loss_fn=loss_fn,
              ckpt=ck, resume=resume, show_progress=False)
        return model

    frozen_before = base_model().state_dict()
    model = run_loop(resume=False)
    assert all(torch.equal(frozen_before[k], v) for k, v in model.state_dict().items() if ".lora_" not in k)
    cfg.max_steps = 6
    model = run_loop(resume=True)  # picks up the adapters and their optimizer state at step 4
    assert [r["step"] for r in run.read_metrics("sft") if "loss" in r][-2:] == [5, 6]
    plain, config, _ = load_policy(run.ckpt("sft"))
    assert config["lora"]["rank"] == 4 and not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain.eval()(ids()), model.eval()(ids()), atol=1e-5)
