"""Batched sampling (llmforge/infer/sampling.py) equals the per-row reference for every parameter,
and the engine's decode path neither reallocates nor regathers its KV cache."""
from __future__ import annotations

import random

import pytest
import torch

from llmforge.config import ModelConfig
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams, adjust_batch, adjust_logits, sample_batch, sample_token
from llmforge.model.kv_cache import KVCache
from llmforge.model.transformer import Transformer

V = 64

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "top_k_and_top_p": dict(temperature=1.3, top_k=10, top_p=0.8),
    "top_p_zero_is_greedy": dict(temperature=1.0, top_p=0.0),
    "presence": dict(temperature=1.0, presence_penalty=1.5),
    "frequency": dict(temperature=1.0, frequency_penalty=0.8),
    "repetition": dict(temperature=1.0, repetition_penalty=1.7),
    "logit_bias": dict(temperature=1.0, logit_bias={3: 5.0, 7: -100.0, 11: 2.5}),
    "constraint": dict(temperature=1.0),
}


@pytest.mark.parametrize("name", CASES)
def test_batched_sampling_equals_the_per_row_reference(name):
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    N = 12
    logits = torch.randn(N, V, generator=g) * 3
    # every row its own parameters: the case's, with the numbers varied per row, next to plain rows
    params, generated, allowed = [], [], []
    for i in range(N):
        kw = dict(CASES[name])
        if "temperature" in kw and kw["temperature"] > 0:
            kw["temperature"] = kw["temperature"] * (0.5 + i / N)
        params.append(SamplingParams(**kw) if i % 3 else SamplingParams(temperature=0.9))
        generated.append([rng.randrange(V) for _ in range(i)])
        allowed.append(torch.rand(V, generator=g) < 0.5 if name == "constraint" and i % 2 else None)
    u = [rng.random() for _ in range(N)]
    batched = adjust_batch(logits, params, generated, allowed)
    tokens, errors = sample_batch(batched, params, u)
    for i in range(N):
        row = adjust_logits(logits[i], params[i], generated[i], allowed[i])
        assert torch.equal(batched[i], row), (name, i)
        assert tokens[i] == sample_token(row, params[i], u[i]), (name, i)
        assert errors[i] is None
    if name == "logit_bias":
        assert all(t != 7 for t, p in zip(tokens, params) if p.logit_bias)


def test_batched_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=1.0, top_p=0.9)
    rng = random.Random(1)
    counts = torch.zeros(4)
    for _ in range(4000):
        t, _ = sample_batch(logits, [p], [rng.random()])
        counts[t[0]] += 1
    probs = torch.softmax(logits[0], -1)
    probs[3] = 0   # the smallest set with mass >= 0.9 is the first three tokens
    probs /= probs.sum()
    assert torch.allclose(counts / 4000, probs, atol=0.03)


def test_an_empty_distribution_is_an_error_for_that_row_alone():
    logits = torch.zeros(2, V)
    nothing = torch.zeros(V, dtype=torch.bool)
    params = [SamplingParams(temperature=1.0)] * 2
    adjusted = adjust_batch(logits, params, [[], []], [nothing, None])
    tokens, errors = sample_batch(adjusted, params, [0.5, 0.5])
    assert errors[0] and "empty" in errors[0] and errors[1] is None


def test_decode_writes_the_kv_cache_in_place_without_reallocating(no_text):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
    model = Transformer(cfg).eval()

    engine = Engine(model, no_text, max_batch=3)
    k, v = engine.cache.k, engine.cache.v
    ptr, shape = k.data_ptr(), tuple(k.shape)
    views = []
    real = engine.cache.update

    def update(layer, key, value, plan):   # every layer attends to a view of the one cache tensor
        kk, vv = real(layer, key, value, plan)
        views.append(kk.untyped_storage().data_ptr() == k.untyped_storage().data_ptr())
        return kk, vv

    engine.cache.update = update
    engine.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], SamplingParams(max_tokens=10, temperature=0.0))
    assert engine.cache.k is k and engine.cache.v is v
    assert k.data_ptr() == ptr and tuple(k.shape) == shape == (2, 3, 2, 32, 8)
    assert views and all(views)   # consecutive slots: no gather, no copy of the keys
    plan = engine.cache.plan(torch.tensor([[5], [5]]), [0, 1])
    assert plan.mask is None and plan.write_at == slice(5, 6)   # same position: no mask, a slice write
    assert KVCache.plan(engine.cache, torch.tensor([[5], [3]]), [0, 2]).mask is not None


def test_one_write_for_all_layers_equals_each_layers_update():
    """KVCache.write (the compiled step's store) puts what KVCache.update puts, and the compiled
    step's read-only view (_overlay) sees what the cache holds once written."""
    from llmforge.infer.compiled import _overlay
    torch.manual_seed(0)
    L, S, H, M, D, B, T = 3, 4, 2, 16, 8, 2, 3
    a, b = KVCache(L, S, H, M, D), KVCache(L, S, H, M, D)
    for c in (a, b):
        c.k.normal_(generator=torch.Generator().manual_seed(1))
    positions, slots = torch.tensor([[4, 5, 6], [0, 1, 2]]), torch.tensor([3, 1])
    k, v = torch.randn(L, B, H, T, D), torch.randn(L, B, H, T, D)
    seen = [_overlay(b.k[layer][slots], k[layer], positions[:, :1]) for layer in range(L)]
    plan = a.plan(positions, slots)
    for layer in range(L):
        a.update(layer, k[layer], v[layer], plan)
    b.write(k, v, positions, slots)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert all(torch.equal(seen[layer], b.k[layer][slots]) for layer in range(L))
