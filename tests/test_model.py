import dataclasses

import pytest
import torch

from llmforge.errors import UserError
from llmforge.model.kv_cache import KVCache
from llmforge.model.transformer import Transformer


def test_causal_mask_future_tokens_never_change_past_logits(tiny_model_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg).eval()
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


@pytest.mark.parametrize("kv_heads,tied,smear", [(2, True, False), (4, False, False), (1, True, False), (2, True, True)])
def test_kv_cache_matches_full_recompute(tiny_model_cfg, kv_heads, tied, smear):
    torch.manual_seed(1)
    cfg = dataclasses.replace(tiny_model_cfg, n_kv_head=kv_heads, tie_embeddings=tied, smear_layers=2 * smear)
    model = Transformer(cfg)
    if smear:  # gates away from their init, one per head, so a wrong neighbour shows
        model.layers[0].attn.smear.data = torch.tensor([-1.0, 2.0])
    model.eval()
    x = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 3)
        parts = [model(x[:, :10], cache=cache, positions=torch.arange(10).expand(3, 10))]
        for t in range(10, 30):
            parts.append(model(x[:, t:t + 1], cache=cache, positions=torch.full((3, 1), t)))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_kv_cache_rows_advance_independently(tiny_model_cfg):
    """Two sequences of different lengths decode in one batch, each at its own positions."""
    torch.manual_seed(2)
    model = Transformer(tiny_model_cfg).eval()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2)
        model(a[:, :11], cache=cache, positions=torch.arange(11)[None], slots=torch.tensor([0]))
        model(b[:, :4], cache=cache, positions=torch.arange(4)[None], slots=torch.tensor([1]))
        step = model(torch.tensor([[a[0, 11]], [b[0, 4]]]), cache=cache,
                     positions=torch.tensor([[11], [4]]), slots=torch.tensor([0, 1]))
        assert torch.allclose(step[0, -1], model(a)[0, -1], atol=1e-5)
        assert torch.allclose(step[1, -1], model(b)[0, -1], atol=1e-5)


def test_tied_embeddings_share_storage_and_count_once(tiny_model_cfg):
    tied = Transformer(tiny_model_cfg)
    untied = Transformer(dataclasses.replace(tiny_model_cfg, tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.flops_per_token(64) > 6 * tied.num_params()  # attention adds to the 6N rule


def test_rope_is_relative(tiny_model_cfg):
    """Rotary embeddings make attention scores depend on relative positions only."""
    from llmforge.model.transformer import apply_rope, rope_tables
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    def score(i, j):
        return float(apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j]))
    assert score(3, 1) == pytest.approx(score(23, 21), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-4)


@pytest.mark.parametrize("change,needle", [({"d_model": 30}, "not divisible"), ({"n_kv_head": 3}, "multiple"),
                                          ({"n_layer": 0}, "positive")])
def test_impossible_model_configs_are_rejected(tiny_model_cfg, change, needle):
    with pytest.raises(UserError, match=needle):
        Transformer(dataclasses.replace(tiny_model_cfg, **change))


def test_sequence_longer_than_context_is_rejected(tiny_model_cfg):
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny_model_cfg)(torch.zeros(1, 65, dtype=torch.long))


def test_zero_init_residual_starts_every_block_as_the_identity(tiny_model_cfg):
    """With zero output projections the logits at init depend on the current token alone."""
    torch.manual_seed(3)
    model = Transformer(dataclasses.replace(tiny_model_cfg, zero_init_residual=True)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        direct = model.lm_head(model.norm(model.embed(x)))
        assert torch.allclose(model(x), direct, atol=1e-5)
    default = Transformer(tiny_model_cfg).eval()
    with torch.no_grad():
        assert not torch.allclose(default(x), default.lm_head(default.norm(default.embed(x))), atol=1e-3)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(tiny_model_cfg):
    torch.manual_seed(4)
    x = torch.randint(0, 97, (2, 12))
    for qk_norm in (True, False):
        model = Transformer(dataclasses.replace(tiny_model_cfg, qk_norm=qk_norm)).eval()
        with torch.no_grad():
            before = model(x)
            for layer in model.layers:
                layer.attn.q_proj.weight.mul_(7.0)
                layer.attn.k_proj.weight.mul_(3.0)
            same = torch.allclose(model(x), before, atol=1e-4)
        assert same == qk_norm


def test_smeared_keys_let_one_layer_copy(tiny_model_cfg):
    """Induction ("after A B ... A comes B") takes two layers of plain attention, a previous-token
    head below an induction head; with smeared keys one layer does it. Trained side by side on
    random tokens followed by the same tokens (lengths vary, so no fixed offset solves it), only
    the smeared model learns the repeat."""
    from llmforge.config import TrainConfig
    from llmforge.train.optim import build_optimizer

    def repeats(g, rows, length):
        run = torch.randint(0, 32, (rows, length), generator=g)
        return torch.cat([run, run], 1)

    acc = {}
    for smear in (False, True):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(tiny_model_cfg, vocab_size=32, n_layer=1, smear_layers=int(smear)))
        opt = build_optimizer(model, TrainConfig(lr=1e-2), "cpu")
        g = torch.Generator().manual_seed(1)
        for step in range(200):
            seq = repeats(g, 32, 6 + step % 9)
            _, loss = model(seq[:, :-1], targets=seq[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            seq = repeats(g, 256, 11)
            acc[smear] = (model(seq[:, :-1]).argmax(-1)[:, 11:] == seq[:, 12:]).float().mean().item()
    assert acc[True] > 0.6 and acc[False] < 0.3, acc  # a run may repeat a token itself: 100% is not reachable


def test_masked_loss_runs_the_head_on_trained_positions_only_with_the_dense_value(tiny_model_cfg):
    """A loss mask selects the rows the head runs on; loss and gradients equal the dense
    formula (full logits, masked mean), weights and all-zero rows included."""
    from llmforge.model.transformer import token_cross_entropy
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg)
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    mask = (torch.rand(3, 20) < 0.6).float() * torch.tensor([[1.0], [0.5], [0.0]])
    logits, loss = model(idx, targets=targets, loss_mask=mask)
    assert logits.shape == (int((mask != 0).sum()), 97)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dense = token_cross_entropy(model(idx), targets, mask)
    dense.backward()
    assert torch.allclose(loss, dense, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_rmsnorm_is_llamas_formula_in_fp32():
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (bf16 input)."""
    from llmforge.model.transformer import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = (torch.randn(2, 3, 16) * 5).bfloat16()
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
