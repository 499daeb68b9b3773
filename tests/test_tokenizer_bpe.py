"""Byte-level BPE tokenizer: specials, lossless round trip, save/load, byte accounting."""
import json

import pytest
import tokenizers
from hypothesis import given, settings, strategies as st

from llmforge.errors import UserError
from llmforge.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b  # 12345 + 678\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Grüße aus Köln! naïve café — 東京は日本の首都です。 😀🎉 "
    "e\u0301 \t tabs\r\nCRLF",
    "Numbers: 3.14159, 2024-01-31, 1000000 and 42.",
] * 5


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics
    return Tokenizer.train(CORPUS + list(topics.values())[:20], vocab_size=400)


def test_specials_are_reserved_ids_0_to_7_in_order(tok):
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(8))
    assert tok.bos_id == 0 and tok.eot_id == 1
    assert tok.vocab_size == 400
    with pytest.raises(UserError, match="not in this tokenizer"):
        tok.token_id("<|nope|>")


def test_special_strings_in_text_are_plain_text(tok):
    text = "user wrote <|end|> and <|bos|><|assistant|> literally"
    ids = tok.encode(text)
    assert not set(ids) & set(range(8))
    assert tok.decode(ids) == text


def test_decode_keeps_special_tokens(tok):
    ids = [tok.bos_id] + tok.encode("hi there") + [tok.token_id("<|end|>"), tok.eot_id]
    assert tok.decode(ids) == "<|bos|>hi there<|end|><|eot|>"


@pytest.mark.parametrize("text", [
    "", " ", "\n\n\n", "\x00\x01\x7f\x1b[31m", "emoji 👩‍👩‍👧‍👦 🏳️‍🌈", "中文和日本語と한국어",
    "a\u0301\u0302\u0303 combining", "\ufeffBOM and \u200b zero width", "mixed\r\nline\rends\n",
    "x" * 5000, "<|end|" + "|>",
])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = ["one", "two words", "", "ünï 😀"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_digits_split_in_groups_of_at_most_three():
    numbers = ["1234567 " * 50, "9876543210 " * 50]  # BPE would love to merge whole numbers
    grouped = Tokenizer.train(numbers, vocab_size=300)
    pieces = [grouped.decode([i]).strip() for i in grouped.encode("1234567 9876543210")]
    assert "123" in pieces and max(len(p) for p in pieces) == 3
    single = Tokenizer.train(numbers, vocab_size=300, single_digits=True)
    pieces = [single.decode([i]).strip() for i in single.encode("1234567 9876543210")]
    assert max(len(p) for p in pieces) == 1


def test_whole_numbers_make_every_digit_group_one_token():
    from llmforge.tokenizer.bpe import NUMBER_GROUPS
    texts = ["def area(r):\n    return 3.14159 * r * r  # 2024\n" * 100, "The cat sat on the mat. " * 200]
    plain = Tokenizer.train(texts, vocab_size=1400)
    whole = Tokenizer.train(texts, vocab_size=1400, whole_numbers=True)
    assert whole.vocab_size <= 1400
    assert all(len(whole.encode(g)) == 1 for g in NUMBER_GROUPS)
    for text in ["358+47", "The answer is 17405.", "x = 1000007", "return 3.14159 * r"]:
        assert whole.decode(whole.encode(text)) == text
    assert [whole.decode([i]) for i in whole.encode("358+47=405")] == ["358", "+", "47", "=", "405"]
    assert [whole.decode([i]) for i in whole.encode("17405")] == ["174", "05"]   # groups of three, from the left
    # the merges learned from the corpus still apply: words tokenize as compactly as without
    assert len(whole.encode("The cat sat on the mat.")) <= len(plain.encode("The cat sat on the mat.")) + 2
    with pytest.raises(UserError, match="single_digits"):
        Tokenizer.train(texts, vocab_size=1400, whole_numbers=True, single_digits=True)
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(texts, vocab_size=1000, whole_numbers=True)


def test_token_bytes_counts_utf8_bytes_and_zero_for_specials(tok):
    sizes = tok.token_bytes()
    assert len(sizes) == tok.vocab_size
    assert sizes[:8] == [0] * 8
    assert min(sizes[8:]) >= 1
    text = "Grüße 東京 😀 plain ascii\n"
    assert sum(sizes[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_save_load_round_trip_and_hash(tok, tmp_path):
    tok.save(tmp_path / "tok" / "tokenizer.json")
    assert not list((tmp_path / "tok").glob("*.tmp"))
    for where in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = Tokenizer.load(where)
        assert loaded.hash == tok.hash
        assert loaded.encode("<|end|> héllo") == tok.encode("<|end|> héllo")
    other = Tokenizer.train(CORPUS, vocab_size=300)
    assert other.hash != tok.hash


def test_load_missing_or_corrupt_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.load(bad)


def test_from_hf_wraps_existing_tokenizer(tok):
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    wrapped = Tokenizer.from_hf(hf)
    assert wrapped.hf is hf
    assert wrapped.encode("<|end|>") == tok.encode("<|end|>")
    assert json.loads(wrapped.hf.to_str())["model"]["type"] == "BPE"


def test_vocab_too_small_is_user_error():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(CORPUS, vocab_size=100)


# ------------------------------------------------------------------ CJK pre-split (issue 11)

def _pieces(pattern: str, text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


def _english_and_code() -> list[str]:
    import sysconfig
    from pathlib import Path
    from pydoc_data.topics import topics
    root = Path(sysconfig.get_paths()["stdlib"])
    code = [(root / name).read_text(encoding="utf-8") for name in ("json/encoder.py", "textwrap.py", "string.py")]
    return CORPUS[:2] + CORPUS[3:4] + list(topics.values())[:30] + code + [
        "x = {'a': 1_000, \"b\": [3.5e-3, 0xFF]}  # ÀÉÎõü ёжик Ελληνικά 한국어 텍스트 عربى\r\n\tfoo()\n"]


@pytest.mark.parametrize("single_digits", [False, True])
def test_cjk_split_leaves_latin_and_code_split_exactly_as_before(single_digits):
    from llmforge.tokenizer.bpe import split_pattern
    before, after = split_pattern(single_digits, 0), split_pattern(single_digits, 3)
    assert before != after
    for text in _english_and_code():
        assert _pieces(after, text) == _pieces(before, text)


def test_cjk_split_trains_the_same_tokenizer_on_english_and_code():
    """The cpu preset's tokenizer (digit groups + whole-number tokens): vocabulary and merges
    are the same with the CJK pre-split on as off, on text without Han/kana."""
    texts = _english_and_code()
    off = Tokenizer.train(texts, vocab_size=1400, whole_numbers=True, cjk_chunk=0)
    on = Tokenizer.train(texts, vocab_size=1400, whole_numbers=True, cjk_chunk=3)
    model = lambda t: json.loads(t.hf.to_str())["model"]  # noqa: E731
    assert model(on)["vocab"] == model(off)["vocab"] and model(on)["merges"] == model(off)["merges"]
    for text in texts:
        assert on.encode(text) == off.encode(text)


def test_cjk_runs_become_short_pieces_not_giant_words():
    from llmforge.tokenizer.bpe import split_pattern
    text = "分词器把原始文本切成语言模型可以计数的片段，abc中文def。これはテストです"
    assert max(len(p) for p in _pieces(split_pattern(False, 0), text)) >= 14   # the GPT-4 split: one giant word
    pieces = _pieces(split_pattern(False, 3), text)
    cjk = [p for p in pieces if all("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in p)]
    assert max(len(p) for p in cjk) == 3 and "，abc" in pieces and "def" in pieces
    assert "".join(pieces) == text
    tok = Tokenizer.train([text] * 20, vocab_size=400, cjk_chunk=3)
    assert tok.decode(tok.encode(text)) == text
