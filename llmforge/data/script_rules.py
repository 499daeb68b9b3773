"""Quality rules for scripts written without spaces (Chinese, Japanese, Korean, Thai).

Gopher's rules count space-separated words; a Chinese paragraph is one "word" per
sentence to them, so every Chinese page fails `too_few_words`. These rules count
characters instead, in the spirit of the multilingual web corpora's cleaning (CCNet,
Wenzek et al. 2020; FineWeb-2, Penedo et al. 2025, which scales Gopher's thresholds per
language; the WuDao/BAAI cleaning of Chinese pages):

    mojibake          text decoded with the wrong codec ("è¿™æ˜¯", "Ã©"), by ftfy's badness score
    boilerplate       too many lines of site chrome (版权所有, 隐私政策, cookies, JavaScript); a few are cut
    too_few_chars     fewer than min_chars non-space characters
    low_script_share  too few characters of the document's own script (a page of Latin with a CJK title)
    punct_ratio       punctuation + symbols share too high (tables of symbols, emoticon spam)
    digit_ratio       digits share too high (price lists, timetables)
    ellipsis_lines / bullet_lines / duplicate_lines   Gopher's line rules, unchanged
    repeated_ngrams   share of characters inside a repeated `ngram_chars`-gram (Gopher's duplicate
                      n-gram rule, on characters: spam that repeats a phrase with small changes)

Kept free of llmforge.config (which imports CharCleanConfig from here).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from llmforge.data.langid import CHAR_SCRIPTS


@dataclass
class CharCleanConfig:
    """[data.clean_chars]: rules for zh / ja / ko / th documents (data/script_rules.py)."""
    min_chars: int = 80                  # non-space characters; the 534-character paragraph of issue 11 passes
    min_script_fraction: float = 0.15    # CJK/Thai characters among non-space ones (technical pages: ~0.2-0.5)
    max_punct_fraction: float = 0.35     # punctuation + symbols among non-space characters
    max_digit_fraction: float = 0.25
    ngram_chars: int = 15                # length of the character n-grams the repetition rule counts (~8 words)
    max_repeated_ngram_fraction: float = 0.4  # characters covered by an n-gram seen twice or more
    max_mojibake_per_kchar: float = 1.0  # ftfy badness per 1000 characters (0 for clean text); both families


_BOILERPLATE = re.compile(
    r"版权所有|版權所有|隐私政策|隱私權政策|使用条款|使用條款|免责声明|免責聲明|启用\s*javascript|啟用\s*javascript"
    r"|cookie|all rights reserved|privacy policy|terms of (?:use|service)|javascript is (?:disabled|required)"
    r"|著作権|プライバシーポリシー|利用規約|개인정보처리방침|이용약관|무단전재",
    re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•‣◦▪·・]|\d+[.)、])\s?")
_SCRIPT = re.compile(f"[{CHAR_SCRIPTS}]")
_SPACE = re.compile(r"\s+")


def mojibake_per_kchar(text: str) -> float:
    """ftfy's count of mis-decoding sequences (and U+FFFD replacement characters) per 1000 characters."""
    from ftfy.badness import badness
    sample = text[:200_000]
    bad = badness(sample) + sample.count("\ufffd")
    return 1000 * bad / max(len(sample), 1)


def duplicate_line_fraction(lines: list[str]) -> float:
    """Share of non-blank lines that repeat an earlier line (Gopher's repetition rule)."""
    seen, dup, total = set(), 0, 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        total += 1
        if line in seen:
            dup += 1
        seen.add(line)
    return dup / total if total else 0.0


def repeated_ngram_fraction(chars: str, n: int) -> float:
    """Share of positions of `chars` covered by an n-gram that occurs more than once."""
    chars = chars[:100_000]
    if len(chars) < 2 * n:
        return 0.0
    grams = [chars[i:i + n] for i in range(len(chars) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(chars))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(covered) / len(chars)


def clean_chars(text: str, r: CharCleanConfig, max_ellipsis: float, max_bullets: float,
                max_duplicate_lines: float, max_boilerplate: float) -> tuple[str | None, str]:
    """(kept text, "kept") or (None, reason) for a document of a character script."""
    if mojibake_per_kchar(text) > r.max_mojibake_per_kchar:
        return None, "mojibake"
    lines = text.splitlines(keepends=True)
    boiler = [bool(_BOILERPLATE.search(line)) for line in lines]
    if lines and sum(boiler) / len(lines) > max_boilerplate:
        return None, "boilerplate"
    if any(boiler):  # C4: drop the offending lines, keep the page
        lines = [line for line, b in zip(lines, boiler) if not b]
        text = "".join(lines)

    chars = _SPACE.sub("", text)
    n = len(chars)
    if n < r.min_chars:
        return None, "too_few_chars"
    if len(_SCRIPT.findall(chars)) / n < r.min_script_fraction:
        return None, "low_script_share"
    categories = Counter(unicodedata.category(c)[0] for c in chars[:100_000])
    sample = min(n, 100_000)
    if (categories["P"] + categories["S"]) / sample > r.max_punct_fraction:
        return None, "punct_ratio"
    if categories["N"] / sample > r.max_digit_fraction:
        return None, "digit_ratio"

    content = [line.rstrip() for line in lines if line.strip()]
    if content:
        if sum(line.endswith(("...", "…", "。。。")) for line in content) / len(content) > max_ellipsis:
            return None, "ellipsis_lines"
        if sum(bool(_BULLET.match(line)) for line in content) / len(content) > max_bullets:
            return None, "bullet_lines"
    if duplicate_line_fraction(lines) > max_duplicate_lines:
        return None, "duplicate_lines"
    if repeated_ngram_fraction(chars, r.ngram_chars) > r.max_repeated_ngram_fraction:
        return None, "repeated_ngrams"
    return text, "kept"
