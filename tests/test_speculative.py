"""Speculative decoding (llmforge/infer/speculative.py): greedy output identical with and without
speculation (and with the compiled decode step), drafts accepted on repetitive text, and the
accept/reject rule leaves each emitted token distributed as plain sampling's."""
from __future__ import annotations

import random

import pytest
import torch

from llmforge.config import ModelConfig
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.infer.speculative import PromptLookup, verify
from llmforge.model.transformer import Transformer

V = 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # init 0.3: decisive random logits, so float rounding between a 1-token and a k-token pass
    # cannot flip an argmax
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64, init_std=0.3)
    return Transformer(cfg).eval()


def prompts():
    pattern = [5, 9, 13, 2, 7, 30, 21]
    return [pattern * 3, [1, 2, 3, 4] * 4 + [1, 2], [40, 41, 42]]


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    d = PromptLookup(k=3)
    assert d.propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]
    assert d.propose([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2]     # the index grows with the sequence
    assert d.propose([1, 2, 3, 4, 1, 2, 3], room=1) == [4]
    assert PromptLookup(k=3).propose([7, 8, 9]) == []
    # a copy that reaches the end continues with itself: a run keeps its period
    assert PromptLookup(k=4).propose([7, 5, 5]) == [5, 5, 5, 5]
    assert PromptLookup(k=4).propose([9, 1, 2, 1, 2]) == [1, 2, 1, 2]


def test_greedy_output_is_identical_with_and_without_speculation(model, no_text):
    params = SamplingParams(max_tokens=30, temperature=0.0)
    base = Engine(model, no_text, max_batch=3)
    plain = base.generate(prompts(), params)
    spec = Engine(model, no_text, max_batch=3, speculate=4)
    fast = spec.generate(prompts(), params)
    assert [o.tokens for o in fast] == [o.tokens for o in plain]
    assert [x for o in fast for x in o.logprobs] == pytest.approx([x for o in plain for x in o.logprobs], abs=1e-4)
    assert spec.stats.accepted_tokens > 0 and spec.stats.steps < base.stats.steps
    # one at a time too (each row its own forward shape), and across the context's end
    for p in prompts():
        alone = Engine(model, no_text, max_batch=1, speculate=3).generate([p], SamplingParams(max_tokens=64, temperature=0.0))
        ref = Engine(model, no_text, max_batch=1).generate([p], SamplingParams(max_tokens=64, temperature=0.0))
        assert alone[0].tokens == ref[0].tokens and alone[0].finish_reason == ref[0].finish_reason == "length"


def test_sampling_with_speculation_reproduces_with_its_seed(model, no_text):
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    a = Engine(model, no_text, max_batch=2, speculate=4).generate(prompts()[:2], params)
    b = Engine(model, no_text, max_batch=2, speculate=4).generate(prompts()[:2], params)
    assert [o.tokens for o in a] == [o.tokens for o in b]


@pytest.mark.parametrize("draft_token", [0, 2])
def test_accept_reject_keeps_the_target_distribution(draft_token):
    """The first emitted token of verify() is distributed as p at position 0, whatever was drafted."""
    logits = torch.tensor([[1.5, 0.5, 0.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    rng = random.Random(0)
    counts = torch.zeros(4)
    n = 6000
    for _ in range(n):
        counts[verify(logits, [draft_token], params, rng)[0]] += 1
    assert torch.allclose(counts / n, torch.softmax(logits[0], -1), atol=0.02)


@pytest.mark.slow
def test_greedy_output_is_identical_compiled_and_uncompiled(model, no_text):
    """Rows at different positions that finish at different steps: the batch shrinks 3 -> 2 -> 1,
    so the compiled step runs padded (3 rows in the bucket of 4) and in the buckets 2 and 1."""
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (12, 8, 4)]
    plain = Engine(model, no_text, max_batch=4, speculate=2).generate(prompts(), params)
    engine = Engine(model, no_text, max_batch=4, compile=True, speculate=2)
    k, ptr = engine.cache.k, engine.cache.k.data_ptr()
    compiled = engine.generate(prompts(), params)
    assert [o.tokens for o in compiled] == [o.tokens for o in plain]
    assert engine.cache.k is k and k.data_ptr() == ptr   # written in place, never reallocated
    # batches above max_rows run eager: 3 rows eager, then 2 and 1 compiled, one cache between them
    mixed = Engine(model, no_text, max_batch=4, compile=True, speculate=2)
    mixed._decode.max_rows = 2
    assert [o.tokens for o in mixed.generate(prompts(), params)] == [o.tokens for o in plain]
