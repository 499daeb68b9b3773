"""Quality filters: keep documents a language model should learn from, drop the rest.

`clean_document(text, code, rules)` returns (kept_text, "kept") or (None, reason); the
reason names the first rule that fired, so `llmforge data prepare` can report how many
documents each rule removed.

Prose gets the Gopher rules (Rae et al. 2021, appendix A: word count, mean word length,
symbol-to-word ratio, share of words with letters, ellipsis and bullet lines, repeated
lines) plus C4's page rules (Raffel et al. 2020: "lorem ipsum" pages go, JavaScript and
cookie-notice lines go). Code gets the lighter rules of The Stack / StarCoder: prose
statistics say nothing about code, so only size, line length, alphanumeric share and
repetition are checked.

Documents in scripts written without spaces (Chinese, Japanese, Korean, Thai) get rules on
characters instead of words (data/script_rules.py): `family` "chars" or "words" picks the
set, detected from the text when not given. Both families drop mojibake.
"""
from __future__ import annotations

import re

from llmforge.config import CleanConfig
from llmforge.data.langid import script_family
from llmforge.data.script_rules import CharCleanConfig, clean_chars, duplicate_line_fraction, mojibake_per_kchar

# Lines that are website chrome rather than content (C4 drops lines mentioning JavaScript
# and cookie/legal notices). Narrow phrases, so documentation *about* JavaScript survives.
_BOILERPLATE = re.compile(
    r"enable javascript|javascript is (?:disabled|required|not enabled)|requires javascript"
    r"|(?:uses|use of|accept(?:s|ing)?(?: all)?) cookies|cookie (?:policy|settings|consent)"
    r"|privacy policy|terms of (?:use|service)|all rights reserved",
    re.IGNORECASE)
_LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•‣◦▪]|\d+[.)])\s")
_ALPHA = re.compile(r"[^\W\d_]")  # a letter in any script
_NOT_ALNUM = re.compile(r"[\W_]+")


def clean_document(text: str, code: bool = False, rules: CleanConfig | None = None,
                   char_rules: CharCleanConfig | None = None, family: str | None = None) -> tuple[str | None, str]:
    """family: "words" (Gopher/C4) or "chars" (zh/ja/ko/th); None = detect it from the text."""
    rules = rules or CleanConfig()
    char_rules = char_rules or CharCleanConfig()
    if not text.strip():
        return None, "empty"
    if len(text) > rules.max_chars:
        return None, "too_long"
    if code:
        return _clean_code(text, rules)
    if (family or script_family(text)) == "chars":
        return clean_chars(text, char_rules, rules.max_ellipsis_line_fraction, rules.max_bullet_line_fraction,
                           rules.max_duplicate_line_fraction, rules.max_boilerplate_line_fraction)
    if mojibake_per_kchar(text) > char_rules.max_mojibake_per_kchar:
        return None, "mojibake"
    return _clean_prose(text, rules)


def _clean_prose(text: str, r: CleanConfig) -> tuple[str | None, str]:
    if _LOREM.search(text):
        return None, "lorem_ipsum"
    lines = text.splitlines(keepends=True)
    boiler = [bool(_BOILERPLATE.search(line)) for line in lines]
    if lines and sum(boiler) / len(lines) > r.max_boilerplate_line_fraction:
        return None, "boilerplate"
    if any(boiler):  # C4: drop the offending lines, keep the page
        lines = [line for line, b in zip(lines, boiler) if not b]
        text = "".join(lines)

    words = text.split()
    n = len(words)
    if n < r.min_words:
        return None, "too_few_words"
    if n > r.max_words:
        return None, "too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not r.min_mean_word_len <= mean_len <= r.max_mean_word_len:
        return None, "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > r.max_symbol_word_ratio:
        return None, "symbol_ratio"
    if sum(1 for w in words if _ALPHA.search(w)) / n < r.min_alpha_word_fraction:
        return None, "alpha_ratio"

    content = [line.rstrip() for line in lines if line.strip()]
    if content:
        if sum(line.endswith(("...", "…")) for line in content) / len(content) > r.max_ellipsis_line_fraction:
            return None, "ellipsis_lines"
        if sum(bool(_BULLET.match(line)) for line in content) / len(content) > r.max_bullet_line_fraction:
            return None, "bullet_lines"
    if duplicate_line_fraction(lines) > r.max_duplicate_line_fraction:
        return None, "duplicate_lines"
    return text, "kept"


def _clean_code(text: str, r: CleanConfig) -> tuple[str | None, str]:
    if len(text.strip()) < r.code_min_chars:
        return None, "too_short"
    lines = text.splitlines()
    lengths = [len(line) for line in lines] or [0]
    if max(lengths) > r.code_max_line_len or sum(lengths) / len(lengths) > r.code_max_mean_line_len:
        return None, "long_lines"
    if len(_NOT_ALNUM.sub("", text)) / len(text) < r.code_min_alnum_fraction:
        return None, "alnum_ratio"
    if duplicate_line_fraction(lines) > r.code_max_duplicate_line_fraction:
        return None, "duplicate_lines"
    return text, "kept"
