"""Grammar-constrained decoding: JSON that always parses and matches a JSON schema.

xgrammar compiles the schema into a pushdown automaton over the tokenizer's vocabulary; at each
step it tells which token ids keep the output a valid prefix of some matching document, and the
engine masks every other logit to -inf before sampling. The engine uses one constraint per
sequence:

    constraint = json_constraint(tok, schema, stop_token_ids=[end_id])   # schema=None: any JSON object
    allowed = constraint.allowed_mask(vocab_size)   # bool (V,), True = may be sampled next
    constraint.advance(token_id)                    # after sampling
    constraint.is_done()                            # the document is complete (stop token taken)

Whitespace between JSON tokens is not allowed (compact output), so once the document closes the
only legal token is a stop token: a small model cannot ramble in spaces forever. A document can
still be cut short by max_tokens (finish_reason "length"), as with any sampler.
"""
from __future__ import annotations

import functools
import json

import torch

from llmforge.errors import UserError

try:  # named in DESIGN.md; imported lazily-safe so the rest of the package works without it
    import xgrammar as xgr
except ImportError:  # pragma: no cover - exercised only where xgrammar is missing
    xgr = None


def _require_xgrammar():
    if xgr is None:
        raise UserError("structured output needs the xgrammar package; pip install xgrammar")


@functools.lru_cache(maxsize=8)
def _compiler_for(vocab: tuple[str, ...], byte_level: bool, stop_ids: tuple[int, ...], vocab_size: int):
    """One TokenizerInfo + GrammarCompiler per vocabulary (xgrammar caches compiled grammars)."""
    info = xgr.TokenizerInfo(list(vocab), vocab_type=xgr.VocabType.BYTE_LEVEL if byte_level else xgr.VocabType.RAW,
                             vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    return xgr.GrammarCompiler(info, max_threads=2)


@functools.lru_cache(maxsize=8)
def _vocab_of(tok) -> tuple[tuple[str, ...], bool]:
    """The token strings by id as xgrammar wants them; special tokens as "" (never text)."""
    from tokenizers import pre_tokenizers

    hf = tok.hf
    size = hf.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    pieces = [hf.id_to_token(i) or "" for i in range(size)]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = all(c in alphabet for i, p in enumerate(pieces) if i not in special for c in p)
    if not byte_level:  # e.g. an imported SentencePiece vocabulary: give decoded text instead
        pieces = [tok.decode([i]) for i in range(size)]
    # xgrammar lets raw control characters (U+0000-U+001F) into JSON strings, which the JSON spec
    # (and json.loads) forbids; compact JSON never needs them, so tokens holding one are banned
    # like specials ("" = never allowed). Byte-level pieces: decode each alone to see its bytes.
    def has_control(i: int) -> bool:
        return any(ord(c) < 0x20 for c in tok.decode([i]))
    return tuple("" if i in special or has_control(i) else p for i, p in enumerate(pieces)), byte_level


def _compiler(tok, stop_token_ids, vocab_size: int | None):
    vocab, byte_level = _vocab_of(tok)
    return _compiler_for(vocab, byte_level, tuple(stop_token_ids), max(vocab_size or 0, len(vocab)))


def check_schema(schema) -> dict:
    """A JSON schema as a dict, or UserError naming what is wrong with it."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UserError(f"response_format json_schema is not valid JSON ({e}); send the schema as an object") from None
    if not isinstance(schema, dict):
        raise UserError("response_format json_schema.schema must be a JSON object (a JSON Schema)")
    try:
        import jsonschema
    except ImportError:
        return schema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise UserError(f"invalid JSON schema at {where}: {e.message}; fix the schema") from None
    return schema


class JSONConstraint:
    """Per-sequence grammar state: which tokens may come next, advanced one token at a time."""

    def __init__(self, compiled, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool (vocab_size,): True where the token keeps the output valid."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = ((self.bitmask[0].unsqueeze(1) >> self._shifts) & 1).bool().flatten()[: self.vocab_size]
        if vocab_size > bits.numel():  # model rows past the tokenizer: never valid text
            bits = torch.cat([bits, torch.zeros(vocab_size - bits.numel(), dtype=torch.bool)])
        return bits[:vocab_size]

    def fill_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """xgrammar's packed int32 form, for engines that apply masks in batches."""
        self.matcher.fill_next_token_bitmask(bitmask, index)

    def advance(self, token_id: int) -> None:
        if not self.matcher.accept_token(int(token_id)):
            raise RuntimeError(f"token {token_id} violates the grammar; sample from allowed_mask() only")

    def is_done(self) -> bool:
        return self.matcher.is_terminated()


def json_constraint(tok, schema: dict | str | None = None, *, stop_token_ids, vocab_size: int | None = None
                    ) -> JSONConstraint:
    """A constraint for any JSON object (schema None, OpenAI's json_object) or one matching `schema`."""
    _require_xgrammar()
    if not stop_token_ids:
        raise ValueError("stop_token_ids must name the token(s) that end the answer, e.g. <|end|>")
    compiler = _compiler(tok, stop_token_ids, vocab_size)
    if schema is None:
        schema = {"type": "object"}
    schema = check_schema(schema)
    try:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with a long C++ message
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"JSON schema cannot be used for constrained decoding ({first}); simplify the schema") from None
    return JSONConstraint(compiled, compiled.tokenizer_info.vocab_size)


class BanTokens:
    """A constraint that never allows some ids (tool_choice 'none' forbids <|tool_call|>)."""

    def __init__(self, vocab_size: int, banned: list[int]):
        import torch
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        self.mask[banned] = False

    def allowed_mask(self, vocab_size: int):
        return self.mask[:vocab_size]

    def advance(self, token_id: int) -> None:
        pass

    def is_done(self) -> bool:
        return False


class ForcedPrefix:
    """A constraint that forces the first tokens of an answer, then allows anything (for
    example a tool call the caller wants made)."""

    def __init__(self, ids: list[int]):
        self.ids, self.i = list(ids), 0

    def allowed_mask(self, vocab_size: int):
        import torch
        if self.i >= len(self.ids):
            return torch.ones(vocab_size, dtype=torch.bool)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.ids[self.i]] = True
        return mask

    def advance(self, token_id: int) -> None:
        self.i += 1

    def is_done(self) -> bool:
        return False
