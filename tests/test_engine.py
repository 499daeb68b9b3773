"""The generation engine (llmforge/infer/engine.py) and its logits filters (sampling.py).

A tiny BPE tokenizer trained here on a few KB of pydoc text and a tiny random Transformer:
the engine's contract (greedy = argmax of a full recompute, batching and queueing change
nothing, seeds reproduce, stops and lengths end requests) holds for any weights.
"""
from __future__ import annotations

import time

import pydoc_data.topics
import pytest
import torch

from llmforge.config import ModelConfig
from llmforge.infer.constrain import ForcedPrefix
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams, filter_logits
from llmforge.model.transformer import Transformer
from llmforge.tokenizer.bpe import Tokenizer

MAX_LEN = 64




@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    topics = pydoc_data.topics.topics
    texts = [topics[k] for k in sorted(topics)][:20]
    text = "\n".join(texts)[:8000]
    return Tokenizer.train([text[i:i + 1000] for i in range(0, len(text), 1000)], vocab_size=320)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(0)
    # a larger init than training's 0.02 makes the random logits decisive, so argmax ties
    # (where float rounding could pick either token) do not occur
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      max_seq_len=MAX_LEN, init_std=0.3)
    return Transformer(cfg).eval()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: re-run the whole sequence each step, no cache, take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def prompts_of(tok, lengths: list[int]) -> list[list[int]]:
    words = tok.encode("The quick brown fox jumps over the lazy dog while the class keyword defines "
                       "a new type and the import statement loads a module from the path. " * 4)
    return [[tok.eot_id] + words[i:i + n - 1] for i, n in enumerate(lengths)]


def test_greedy_equals_step_by_step_full_recompute(model, tok):
    prompt = prompts_of(tok, [9])[0]
    out = Engine(model, tok, max_batch=1).generate([prompt], greedy(24))[0]
    assert out.tokens == recompute_greedy(model, prompt, 24)
    assert out.finish_reason == "length" and out.prompt_len == len(prompt)
    assert out.text == tok.decode(out.tokens)


def test_batched_prompts_of_different_lengths_match_one_at_a_time(model, tok):
    prompts = prompts_of(tok, [3, 11, 6, 17])
    together = Engine(model, tok, max_batch=4).generate(prompts, greedy(16))
    alone = [Engine(model, tok, max_batch=1).generate([p], greedy(16))[0] for p in prompts]
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    assert len({tuple(o.tokens) for o in together}) > 1  # the rows really differ


def test_more_requests_than_slots_queue_and_all_finish(model, tok):
    prompts = prompts_of(tok, [4, 9, 5, 12, 7, 3, 8])
    lengths = [5, 12, 3, 9, 1, 7, 10]  # requests end at different steps, freeing slots mid-run
    engine = Engine(model, tok, max_batch=2)
    outs = engine.generate(prompts, [greedy(n) for n in lengths])
    assert [len(o.tokens) for o in outs] == lengths
    assert all(o.finish_reason == "length" for o in outs)
    assert engine.stats.max_decode_batch == 2 and not engine.has_work()
    assert sorted(engine.free_slots) == [0, 1]
    for p, n, o in zip(prompts, lengths, outs):
        assert o.tokens == recompute_greedy(model, p, n)


def test_prefix_cache_reuses_a_shared_prefix_and_changes_no_output(model, tok):
    system = prompts_of(tok, [40])[0]            # a shared "system prompt": 2 blocks of 16 + 8 tokens
    tails = [tok.encode(t) for t in (" one", " and two", " three four five", " six")]
    prompts = [system + t for t in tails] + [system[:20] + tails[0], system]
    seeds = [dict(temperature=0.9, seed=k) for k in range(len(prompts))]
    plain = Engine(model, tok, max_batch=2)
    cached = Engine(model, tok, max_batch=2, prefix_cache_tokens=64)
    for engine in (plain, cached):   # one at a time, so every prompt after the first can hit
        engine.outs = [engine.generate([p], SamplingParams(max_tokens=12, **kw))[0] for p, kw in zip(prompts, seeds)]
    assert [o.tokens for o in cached.outs] == [o.tokens for o in plain.outs]
    assert [x for o in cached.outs for x in o.logprobs] == pytest.approx([x for o in plain.outs for x in o.logprobs],
                                                                         abs=1e-4)
    # prompts 2-4 and the bare system prompt reuse both 16-token blocks, the 20-token prefix reuses one
    assert cached.stats.prefix_hit_tokens == 32 * 3 + 16 + 32
    assert cached.stats.prefill_tokens == plain.stats.prefill_tokens - cached.stats.prefix_hit_tokens
    assert cached.prefix_cache.tokens <= 64   # bounded: least recently used blocks were dropped
    for p in prompts[:2]:
        assert cached.generate([p], greedy(8))[0].tokens == recompute_greedy(model, p, 8)


def test_seeds_reproduce_and_differ(model, tok):
    prompt = prompts_of(tok, [6])[0]

    def sample(seed, engine=None, companions=()):
        engine = engine or Engine(model, tok, max_batch=4)
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
        others = [SamplingParams(max_tokens=20, temperature=1.0, seed=99)] * len(companions)
        return engine.generate([prompt, *companions], [params, *others])[0].tokens

    first = sample(7)
    assert sample(7) == first
    # a request's own generator: its draws do not depend on what else is in the batch
    assert sample(7, companions=prompts_of(tok, [10, 4])) == first
    assert sample(8) != first


def test_top_k_1_equals_greedy(model, tok):
    prompt = prompts_of(tok, [8])[0]
    engine = Engine(model, tok, max_batch=1)
    sampled = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=3))[0]
    assert sampled.tokens == engine.generate([prompt], greedy(20))[0].tokens


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # shuffled: the filter must sort
    logits = probs.log()
    assert _kept(filter_logits(logits, 0, 0.4)) == {1}
    assert _kept(filter_logits(logits, 0, 0.75)) == {1, 3}
    assert _kept(filter_logits(logits, 0, 0.9)) == {1, 2, 3}
    assert _kept(filter_logits(logits, 0, 0.99)) == {0, 1, 2, 3}
    assert _kept(filter_logits(logits, 2, 0.99)) == {1, 3}  # top-k applies first
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(50, generator=g) * 3
        p = float(torch.rand((), generator=g))
        kept = sorted(_kept(filter_logits(logits, 0, p)), key=lambda i: -logits[i])
        probs = torch.softmax(logits, -1)
        mass = float(probs[kept].sum())
        assert mass >= p - 1e-6                              # reaches p
        assert float(probs[kept[:-1]].sum()) < p + 1e-6      # one token fewer would not
        dropped = [i for i in range(50) if i not in kept]
        assert not dropped or probs[kept].min() >= probs[dropped].max()  # the most likely ones


def test_stop_token_ends_with_stop_and_is_not_in_text(model, tok):
    prompt = prompts_of(tok, [5])[0]
    free = recompute_greedy(model, prompt, 30)
    stop_id = free[6]
    first = free.index(stop_id)
    out = Engine(model, tok, max_batch=1).generate([prompt], greedy(30, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.tokens == free[:first + 1]
    assert out.text == tok.decode(free[:first])


def test_stop_string_cuts_text_before_it(model, tok):
    prompt = prompts_of(tok, [5])[0]
    free = recompute_greedy(model, prompt, 40)
    # a stop string the greedy text will contain: a printable ASCII piece from its middle
    j = next(j for j in range(5, 40) if (s := tok.decode([free[j]])).strip() and s.isascii() and s.isprintable())
    stop = tok.decode([free[j]])
    out = Engine(model, tok, max_batch=1).generate([prompt], greedy(40, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    # generation ends at the first token whose text completes the stop string
    end = next(i for i in range(40) if stop in tok.decode(free[:i + 1]))
    assert out.tokens == free[:end + 1]
    full = tok.decode(free[:end + 1])
    assert out.text == full[:full.find(stop)]


def test_stream_deltas_add_up_to_the_text_and_never_show_a_stop_strings_start(model, tok):
    prompt = prompts_of(tok, [5])[0]
    pieces = ["alpha", " be", "ta", " gam", "ma"]        # forced tokens; " beta gam" is the stop string
    forced = [i for p in pieces for i in tok.encode(p)]
    engine = Engine(model, tok, max_batch=1)
    rid = engine.add(prompt, greedy(len(forced) + 4, stop=[" beta gam"]), ForcedPrefix(forced))
    deltas, done = [], None
    while done is None:
        for ev in engine.step():
            assert ev.request_id == rid
            deltas.append(ev.text_delta)
            done = ev.completion if ev.finished else None
    assert done.finish_reason == "stop" and done.text == "alpha"
    assert "".join(deltas) == "alpha"        # " be" and " beta" were held back, never sent then taken back


def test_max_tokens_and_context_end_give_length(model, tok):
    engine = Engine(model, tok, max_batch=2)
    short, near_end = prompts_of(tok, [4, MAX_LEN - 3])
    a, b = engine.generate([short, near_end], greedy(10))
    assert len(a.tokens) == 10 and a.finish_reason == "length"
    # the context ends first: the last token sampled is the one predicted at position MAX_LEN - 1
    assert len(b.tokens) == 3 and b.finish_reason == "length"
    assert b.tokens == recompute_greedy(model, near_end, 3)


def test_prompt_longer_than_context_raises(model, tok):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ValueError, match="does not fit the context"):
        engine.add([tok.eot_id] * (MAX_LEN + 5), greedy(4))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add([], greedy(4))
    assert not engine.has_work()


class _Exploding:
    """A constraint that fails on its third token (a stand-in for any per-row bug)."""

    def __init__(self):
        self.n = 0

    def allowed_mask(self, vocab_size):
        self.n += 1
        if self.n == 3:
            raise RuntimeError("constraint exploded")
        return torch.ones(vocab_size, dtype=torch.bool)

    def advance(self, token_id):
        pass

    def is_done(self):
        return False


def test_an_error_in_one_row_ends_that_request_alone(model, tok):
    prompts = prompts_of(tok, [5, 7, 9])
    alone = Engine(model, tok, max_batch=4).generate(prompts, greedy(12))
    engine = Engine(model, tok, max_batch=4)
    ids = [engine.add(p, greedy(12), _Exploding() if i == 1 else None) for i, p in enumerate(prompts)]
    done, errors = {}, {}
    while len(done) < 3:
        for ev in engine.step():
            if ev.finished:
                done[ev.request_id] = ev.completion
                if ev.error:
                    errors[ev.request_id] = ev.error
    assert list(errors) == [ids[1]] and "exploded" in errors[ids[1]] and done[ids[1]].finish_reason == "error"
    assert done[ids[0]].tokens == alone[0].tokens and done[ids[2]].tokens == alone[2].tokens
    assert len(engine.free_slots) == 4 and not engine.has_work()


def test_top_p_zero_is_greedy(model, tok):
    prompt = prompts_of(tok, [6])[0]
    engine = Engine(model, tok, max_batch=1)
    sampled = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.0, seed=1))[0]
    assert sampled.tokens == engine.generate([prompt], greedy(10))[0].tokens
    assert _kept(filter_logits(torch.randn(50), 0, 0.0)) and len(_kept(filter_logits(torch.randn(50), 0, 0.0))) == 1


def test_token_ids_outside_the_vocabulary_are_refused(model, tok):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([1, tok.vocab_size + 5], greedy(2))


@pytest.mark.parametrize("through_scheduler", [False, True])
def test_a_slow_tool_call_is_parked_and_does_not_stall_other_rows(model, tok, through_scheduler):
    """The tool blocks until the other request has finished: if tools ran inside the engine step,
    the other request could never finish first and the tool would time out."""
    import threading

    from llmforge.serve.scheduler import Scheduler

    other_done = threading.Event()
    seen = {}

    def slow_tool(name, arguments):
        seen["other_finished_first"] = other_done.wait(timeout=60)
        return "42"

    end, call = tok.token_id("<|end|>"), tok.token_id("<|tool_call|>")
    forced = [call] + tok.encode('{"name": "calculator", "arguments": {}}') + [end]
    engine = Engine(model, tok, max_batch=4, tool_runner=slow_tool)
    p_tool = SamplingParams(max_tokens=len(forced) + 6, temperature=0.0, stop_token_ids=[end], execute_tools=True)
    p_other = greedy(20)
    prompts = prompts_of(tok, [5, 6])
    if not through_scheduler:
        ids = [engine.add(prompts[0], p_tool, ForcedPrefix(forced)), engine.add(prompts[1], p_other)]
        results = {}
        while len(results) < 2:
            events = engine.step()
            for ev in events:
                if ev.finished:
                    results[ev.request_id] = ev.completion
                    if ev.request_id == ids[1]:
                        other_done.set()
            if not events and engine.parked:
                time.sleep(0.01)
        tool_run = results[ids[0]]
    else:
        scheduler = Scheduler(engine, batch_wait_s=0)
        finished = {}
        done = threading.Event()

        def on_event(name):
            def cb(ev):
                if not isinstance(ev, Exception) and ev.finished:
                    finished[name] = ev.completion
                    if name == "other":
                        other_done.set()
                    if len(finished) == 2:
                        done.set()
            return cb

        scheduler.submit(prompts[0], p_tool, ForcedPrefix(forced), on_event("tool"))
        scheduler.submit(prompts[1], p_other, None, on_event("other"))
        assert done.wait(timeout=120)
        scheduler.stop()
        tool_run = finished["tool"]
    assert seen["other_finished_first"]
    assert tool_run.tool_calls_run == 1 and "42" in tok.decode(tool_run.tokens)
    assert len(engine.free_slots) == 4 and not engine.has_work()


def test_max_tokens_counts_what_the_model_wrote_not_the_tool_results_the_engine_inserted(model, tok):
    """A tool result longer than what is left of max_tokens must not end the request: the model
    still gets its max_tokens of its own (as OpenAI counts completion tokens), so a long result
    never cuts the answer that follows it."""
    end, call = tok.token_id("<|end|>"), tok.token_id("<|tool_call|>")
    forced = [call] + tok.encode('{"name":"python"}') + [end]
    engine = Engine(model, tok, max_batch=2, tool_runner=lambda name, arguments: "the import statement")
    budget = len(forced) + 6
    params = SamplingParams(max_tokens=budget, temperature=0.0, stop_token_ids=[end], execute_tools=True)
    out = engine.generate(prompts_of(tok, [4]), params, constraints=[ForcedPrefix(forced)])[0]
    assert out.tool_calls_run == 1 and out.inserted > 6          # the result alone exceeds the 6 tokens left
    assert 4 + len(out.tokens) < MAX_LEN                          # and the context is not what ended it
    generated = sum(out.generated)
    assert generated == out.n_generated == len(out.tokens) - out.inserted
    if out.finish_reason == "length":     # the model wrote its whole budget after the result
        assert generated == budget
    else:                                  # or ended its answer itself, after writing some of it
        assert out.finish_reason == "stop" and len(forced) + 1 < generated <= budget
