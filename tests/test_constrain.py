"""Grammar-constrained decoding: a random tiny model, sampled at temperature 1, always writes
JSON that parses and validates against the schema."""
import json

import jsonschema
import pytest

from llmforge.errors import UserError
from llmforge.infer.constrain import json_constraint
from llmforge.infer.engine import Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.serve.tiny import make_tiny_checkpoint
from llmforge.train.checkpoint import load_model, load_tokenizer

SCHEMAS = [
    {"type": "object",
     "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "ok": {"type": "boolean"},
                    "city": {"enum": ["Paris", "Rome", "Oslo"]},
                    "note": {"type": "string", "maxLength": 12}},
     "required": ["answer", "ok", "city", "note"]},
    {"type": "object",
     "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
                    "score": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["tags"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "sft")
    model, _, _ = load_model(folder)
    tok = load_tokenizer(folder)
    return model, tok, Engine(model, tok, max_batch=8)


def _prompt(tok, text):
    return [tok.bos_id, tok.token_id("<|user|>")] + tok.encode(text) + [tok.token_id("<|end|>"),
                                                                        tok.token_id("<|assistant|>")]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_constrained_samples_parse_and_validate(tiny, schema):
    model, tok, engine = tiny
    end = tok.token_id("<|end|>")
    n = 4
    constraints = [json_constraint(tok, schema, stop_token_ids=[end], vocab_size=model.cfg.vocab_size)
                   for _ in range(n)]
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, stop_token_ids=[end]) for s in range(n)]
    outs = engine.generate([_prompt(tok, "give me json")] * n, params, constraints=constraints)
    specials = {tok.token_id(s) for s in ("<|bos|>", "<|eot|>", "<|user|>", "<|assistant|>", "<|tool_call|>",
                                          "<|tool_result|>", "<|system|>")}
    texts = set()
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert out.tokens[-1] == end and not specials & set(out.tokens)
        jsonschema.validate(json.loads(out.text), schema)
        texts.add(out.text)
    assert len(texts) > 1      # really sampled, not one forced string


def test_json_object_mode_gives_an_object(tiny):
    model, tok, engine = tiny
    end = tok.token_id("<|end|>")
    c = json_constraint(tok, None, stop_token_ids=[end], vocab_size=model.cfg.vocab_size)
    out = engine.generate([_prompt(tok, "json please")], SamplingParams(max_tokens=60, temperature=0.0,
                                                                       stop_token_ids=[end]), constraints=[c])[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_mask_allows_only_grammar_tokens(tiny):
    model, tok, _ = tiny
    end = tok.token_id("<|end|>")
    c = json_constraint(tok, {"enum": ["yes", "no"]}, stop_token_ids=[end], vocab_size=model.cfg.vocab_size + 7)
    mask = c.allowed_mask(model.cfg.vocab_size + 7)
    assert mask.shape == (model.cfg.vocab_size + 7,) and not mask[model.cfg.vocab_size:].any()
    allowed = [tok.decode([i]) for i in mask.nonzero().flatten().tolist()]
    assert allowed and all(a.startswith('"') or '"yes"'.startswith(a) or '"no"'.startswith(a) for a in allowed)
    assert not mask[end]   # cannot stop before the document closes
    for t in tok.encode('"no"'):
        assert c.allowed_mask(model.cfg.vocab_size)[t]
        c.advance(t)
    assert c.allowed_mask(model.cfg.vocab_size)[end]
    c.advance(end)
    assert c.is_done()


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, "{not json", [1, 2],
                                    {"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}])
def test_invalid_schema_is_a_clear_user_error(tiny, schema):
    _, tok, _ = tiny
    with pytest.raises(UserError, match="schema"):
        json_constraint(tok, schema, stop_token_ids=[tok.token_id("<|end|>")])
