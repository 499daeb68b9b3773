"""Which language a document is in, and whether it is written in words or in characters.

    script_counts(text)  -> Counter of han / kana / hangul / thai characters and space-separated words
    script_family(text)  -> "chars" (zh ja ko th: rules and shingles on characters) or "words"
    language(text)       -> ISO 639-1 code: "zh", "ja", "ko", "th" from the script counts, else py3langid

Character scripts are decided by counting code points, which is exact and fast; py3langid
(a maintained fork of langid.py, Lui & Baldwin 2012, 97 languages, its model inside the
wheel: nothing is downloaded) names the language of everything else. Code is not
identified: a source with code = true records "code".

Traditional and Simplified Chinese are both "zh": the script is not converted (the two
spellings of a text are different strings, so dedup keeps both), and the `languages`
filter and the language weights treat them as one language.
"""
from __future__ import annotations

import re
from collections import Counter

# Code point ranges of the scripts written without spaces between words.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
THAI = "\u0e00-\u0e7f"
CHAR_SCRIPTS = HAN + KANA + HANGUL + THAI
_SCRIPTS = {"han": re.compile(f"[{HAN}]"), "kana": re.compile(f"[{KANA}]"),
            "hangul": re.compile(f"[{HANGUL}]"), "thai": re.compile(f"[{THAI}]")}
# a word of a space-separated script: letters that are not in the character scripts
_WORD = re.compile(f"(?:(?![{CHAR_SCRIPTS}])[^\\W\\d_])+")
CHAR_LANGUAGES = ("zh", "ja", "ko", "th")
PREFIX_CHARS = 4000   # language ID reads this much of a document: more does not change the answer


def script_counts(text: str) -> Counter:
    text = text[:PREFIX_CHARS * 4]
    counts = Counter({name: len(rx.findall(text)) for name, rx in _SCRIPTS.items()})
    counts["words"] = len(_WORD.findall(text))
    return counts


def _char_language(c: Counter) -> str | None:
    """zh / ja / ko / th when characters of those scripts outnumber space-separated words."""
    cjk = c["han"] + c["kana"] + c["hangul"] + c["thai"]
    if cjk == 0 or cjk < c["words"]:
        return None
    if c["thai"] > cjk / 2:
        return "th"
    if c["hangul"] > cjk / 2:
        return "ko"
    if c["kana"] >= 0.1 * cjk:   # Japanese mixes kanji (han) with kana; Chinese has no kana
        return "ja"
    if c["hangul"] > c["han"]:
        return "ko"
    return "zh"


def script_family(text: str) -> str:
    return "chars" if _char_language(script_counts(text)) else "words"


def _classify(text: str) -> str:
    import py3langid  # loads its model (~0.5 s) on the first call
    return py3langid.classify(text[:PREFIX_CHARS])[0]


def language(text: str) -> str:
    """The document's language code (ISO 639-1), "und" for text with no letters."""
    counts = script_counts(text)
    lang = _char_language(counts)
    if lang:
        return lang
    if counts["words"] == 0:
        return "und"
    return _classify(text)
