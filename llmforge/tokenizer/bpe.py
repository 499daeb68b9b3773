"""Byte-level BPE tokenizer (HF `tokenizers`), GPT-4-style pre-tokenization, chat specials.

How text becomes ids:
  1. a GPT-4 (cl100k) regex splits text into pre-tokens: words with their leading space,
     runs of 1-3 digits (or single digits), punctuation runs, newlines, other whitespace;
  2. each pre-token's UTF-8 bytes are mapped to 256 printable characters (GPT-2's byte
     alphabet), so every string, emoji and control character included, is representable;
  3. learned merges join frequent byte pairs (Sennrich et al. 2016, BPE).
The eight chat special tokens take ids 0..7. `encode` never produces them from text: a
user typing "<|end|>" gets plain bytes, so prompts cannot forge turn boundaries. Code
that needs a special inserts its id from `token_id()`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from llmforge.errors import UserError
from llmforge.run import write_text_atomic

SPECIAL_TOKENS = ["<|bos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|tool_call|>", "<|tool_result|>", "<|end|>"]

# GPT-4's split pattern: contractions, letters with one optional leading non-letter,
# numbers in groups of at most three digits, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
# Same, with every digit its own pre-token (Llama / DeepSeek style, helps arithmetic).
_SPLIT_PATTERN_SINGLE_DIGITS = _SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Chinese and Japanese have no spaces, so to the GPT-4 pattern a whole sentence of Han/kana
# is one "word" (a pre-token of hundreds of bytes: merges then span word boundaries at random
# and BPE training counts every sentence as its own word). With cjk_chunk = k, runs of Han and
# kana are cut into pieces of at most k characters and never glued to a neighbouring Latin
# word. The letter class becomes "letters except Han/kana", which is the same class on text
# without Han/kana: Latin, Cyrillic, Hangul, code and numbers split exactly as before.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}ー"
_LETTERS = r"[^\r\n\p{L}\p{N}]?+\p{L}+"


def split_pattern(single_digits: bool = False, cjk_chunk: int = 0) -> str:
    """The pre-tokenizer regex: GPT-4's, optionally single digits, optionally CJK runs in pieces."""
    pattern = _SPLIT_PATTERN_SINGLE_DIGITS if single_digits else _SPLIT_PATTERN
    if cjk_chunk > 0:
        pattern = pattern.replace(_LETTERS, rf"[^\r\n\p{{L}}\p{{N}}]?+[\p{{L}}&&[^{_CJK}]]+|[{_CJK}]{{1,{cjk_chunk}}}")
    return pattern


# every pre-token the digit-group split can make: "0".."9", "00".."99", "000".."999"
NUMBER_GROUPS = [f"{n:0{width}d}" for width in (1, 2, 3) for n in range(10 ** width)]


def _with_number_tokens(hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Append the merges that make every 1-3 digit group one token. Copying a number from the
    question into an answer is then copying one token (one attention hop); with single digits
    it is copying a run of tokens in order, which needs an induction head, and no 4-layer model
    trained for the speedrun's minutes had one (bench/copy_probe.py). Measured: the SFT model on
    these tokens copies the last operand into its calculator call, on single digits neither.
    Each group is merged from the two pieces the merges so far leave it in, shortest groups
    first, so the learned merges still apply and rank before the added ones."""
    spec = json.loads(hf.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    next_id = max(vocab.values()) + 1

    ranks = {tuple(m.split(" ") if isinstance(m, str) else m): r for r, m in enumerate(merges)}

    def pieces(group: str) -> list[str]:   # BPE on one pre-token with the merges so far
        parts = list(group)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    for group in NUMBER_GROUPS:
        if group in vocab:
            continue
        parts = pieces(group)
        assert len(parts) == 2, (group, parts)   # every shorter group is a token already
        merges.append(parts)                     # tokenizers' JSON: merges as [left, right] pairs
        ranks[tuple(parts)] = len(ranks)
        vocab[group] = next_id
        next_id += 1
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the project's conventions."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        # Special-token strings inside user text are encoded as ordinary text.
        self.hf.encode_special_tokens = True
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self._token_bytes: list[int] | None = None

    # ------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, single_digits: bool = False,
              whole_numbers: bool = False, show_progress: bool = False, cjk_chunk: int = 0) -> "Tokenizer":
        """Learn `vocab_size - 256 - 8` merges from `texts` (an iterable of documents).
        whole_numbers (with digit groups, not single digits): every 1-3 digit group is one
        token, so a number of up to three digits is one token wherever it occurs.
        cjk_chunk > 0: Han/kana runs are pre-split into pieces of at most that many characters."""
        minimum = 256 + len(SPECIAL_TOKENS) + (len(NUMBER_GROUPS) if whole_numbers else 0)
        if vocab_size < minimum:
            raise UserError(f"tokenizer.vocab_size={vocab_size} is too small; byte-level BPE needs at "
                            f"least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials"
                            f"{' + the 1-3 digit groups' if whole_numbers else ''})")
        if whole_numbers and single_digits:
            raise UserError("tokenizer.whole_numbers needs digit groups; set tokenizer.single_digits=false")
        pattern = split_pattern(single_digits, cjk_chunk)
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            # whole numbers: leave room, the number merges the corpus did not learn are added after
            vocab_size=vocab_size - (len(NUMBER_GROUPS) if whole_numbers else 0),
            special_tokens=SPECIAL_TOKENS,  # added first, so they get ids 0..7 in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(_with_number_tokens(hf) if whole_numbers else hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load tokenizer.json, or the tokenizer.json inside directory `path`."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist; run `llmforge tokenizer train` "
                            "(or `llmforge data prepare`) for this run first")
        try:
            hf = tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise UserError(f"tokenizer file {path} is corrupt ({str(e).splitlines()[0][:120]}); "
                            "delete it and run `llmforge tokenizer train` again") from None
        return cls(hf)

    @classmethod
    def from_hf(cls, hf_tokenizer: tokenizers.Tokenizer) -> "Tokenizer":
        """Wrap an existing `tokenizers.Tokenizer` (e.g. one from an imported model)."""
        return cls(hf_tokenizer)

    def save(self, path) -> None:
        """Write tokenizer.json atomically (`path` may be the file or its directory)."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        write_text_atomic(path, self.hf.to_str(pretty=True))

    # ------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise UserError(f"token {token!r} is not in this tokenizer's vocabulary; use a tokenizer "
                            "trained by llmforge (it reserves the chat special tokens)")
        return i

    @property
    def bos_id(self) -> int:
        return self.token_id("<|bos|>")

    @property
    def eot_id(self) -> int:
        return self.token_id("<|eot|>")

    # ------------------------------------------------------------ measurements

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length each id decodes to; 0 for special tokens. Bits-per-byte divides
        a sum of token losses by the bytes those tokens stand for, so specials count 0."""
        if self._token_bytes is None:
            alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # 256 chars, one per byte
            special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
            sizes = []
            for i in range(self.vocab_size):
                piece = self.hf.id_to_token(i)
                if i in special or piece is None:
                    sizes.append(0)
                elif all(c in alphabet for c in piece):
                    sizes.append(len(piece))  # one alphabet character per byte
                else:  # not byte-level (an imported SentencePiece vocab): ask the decoder
                    sizes.append(len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8")))
            self._token_bytes = sizes
        return list(self._token_bytes)

    @property
    def hash(self) -> str:
        """sha256 of the canonical (sorted-key, compact) tokenizer.json."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
