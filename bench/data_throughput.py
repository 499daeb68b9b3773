"""Multilingual data preparation on a bilingual test corpus: what is kept, what planted junk is
removed, throughput per language, and the bilingual tokenizer's bytes/token per language.

    nice -n 19 python bench/data_throughput.py [--zh-locale zh_TW] [--junk 40] [--vocab 4096]

Corpus (built in memory, nothing downloaded):
  clean zh  Debian's Chinese manual pages (`apt-get install manpages-zh`) of --zh-locale, the
            pages language ID calls zh. The character rules' thresholds were set on zh_CN; the
            default zh_TW (Traditional, translated separately) is held out from that choice.
  clean en  the pydoc topics shipped with Python;  code: the first --code stdlib files.
  junk      for zh and en alike, --junk documents of each kind built from clean ones:
            boilerplate (a page of cookie/copyright/privacy lines around a few lines of text),
            repeated_lines (a document with one line repeated 15 times), mojibake (UTF-8 read as
            cp1252), near_duplicate (a character changed every 5 clauses for zh, a word every 90
            words for en: both give a true shingle Jaccard of ~0.89 with the original, printed).
Prints: share of clean documents kept per language (and why the others went), the removal
rate of each kind of junk per language, MB/s per language of language ID + cleaning + dedup
(one process; on a shared 2-core machine the numbers are lower bounds), and bytes/token per
language of a BPE tokenizer trained on the kept mixture (whole-number digit groups as the cpu
preset, CJK pre-split 4) next to the reference WordPiece tokenizer when it is installed.
"""
from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter, defaultdict

from llmforge.config import CleanConfig, SourceConfig
from llmforge.data.clean import clean_document
from llmforge.data.dedup import Deduplicator, exact_key
from llmforge.data.langid import CHAR_LANGUAGES, language
from llmforge.data.script_rules import CharCleanConfig
from llmforge.data.sources import iter_documents

BOILER = {"zh": ["版权所有 © 2024 示例网站 保留所有权利", "隐私政策 | 使用条款 | 免责声明", "本网站使用 Cookie 以改善您的体验",
                 "请启用 JavaScript 以获得最佳浏览效果"],
          "en": ["Copyright © 2024 Example Site. All rights reserved.", "Privacy Policy | Terms of Use | Contact",
                 "This site uses cookies to improve your experience; accept cookies to continue.",
                 "Please enable JavaScript to view this page."]}


def near_copy(text: str, lang: str, rng: random.Random) -> str:
    if lang == "zh":
        parts = re.split(r"([，。；\n])", text)
        for i in range(0, len(parts), 10):
            if len(parts[i]) > 3:
                parts[i] = parts[i][:2] + ("其" if parts[i][2] != "其" else "该") + parts[i][3:]
        return "".join(parts)
    words = text.split(" ")
    for i in range(rng.randrange(90), len(words), 90):  # true Jaccard ~0.89, as zh's edits give
        words[i] = "changed"
    return " ".join(words)


def junk(clean: list[str], lang: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for kind in ("boilerplate", "repeated_lines", "mojibake", "near_duplicate"):
        for text in rng.sample(clean, min(n, len(clean))):
            lines = [line for line in text.splitlines() if line.strip()]
            if kind == "boilerplate":
                doc = "\n".join(BOILER[lang] * 3 + lines[:5] + BOILER[lang]) + "\n"
            elif kind == "repeated_lines":
                doc = text + (max(lines, key=len) + "\n") * 15
            elif kind == "mojibake":
                doc = text.encode("utf-8").decode("cp1252", errors="replace")
            else:
                doc = near_copy(text, lang, rng)
            out.append((kind, doc))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zh-locale", default="zh_TW")
    ap.add_argument("--junk", type=int, default=40, help="documents of each junk kind per language")
    ap.add_argument("--code", type=int, default=300, help="stdlib files in the code share")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    zh = [d["text"] for d in iter_documents(SourceConfig(name="zh", kind="manpages", path=args.zh_locale))]
    zh = [t for t in zh if language(t) == "zh"]
    en = [d["text"] for d in iter_documents(SourceConfig(name="pydoc", kind="pydoc"))]
    code = [d["text"] for d in iter_documents(SourceConfig(name="stdlib", kind="stdlib", max_docs=args.code))]
    corpus = [("zh", "clean", t) for t in zh] + [("en", "clean", t) for t in en] + [("code", "clean", t) for t in code]
    corpus += [("zh", k, t) for k, t in junk(zh, "zh", args.junk, rng)]
    corpus += [("en", k, t) for k, t in junk(en, "en", args.junk, rng)]

    rules, char_rules = CleanConfig(), CharCleanConfig()
    dd = Deduplicator()
    seconds, nbytes = Counter(), Counter()
    outcome: dict[tuple[str, str], Counter] = defaultdict(Counter)
    kept_docs: dict[str, list[str]] = defaultdict(list)
    for i, (lang, kind, text) in enumerate(corpus):   # clean documents first, as a corpus would hold them
        started = time.perf_counter()
        is_code = lang == "code"
        found = "code" if is_code else language(text)
        family = "chars" if found in CHAR_LANGUAGES else "words"
        cleaned, reason = clean_document(text, code=is_code, rules=rules, char_rules=char_rules, family=family)
        if cleaned is not None:
            reason = dd.check(str(i), cleaned, exact_key(cleaned), family=family) or "kept"
        seconds[lang] += time.perf_counter() - started
        nbytes[lang] += len(text.encode("utf-8"))
        outcome[(lang, kind)][reason] += 1
        if reason == "kept" and kind == "clean":
            kept_docs[lang].append(cleaned)

    print(f"corpus: {len(zh)} zh pages ({args.zh_locale}), {len(en)} en pydoc topics, {len(code)} stdlib files, "
          f"{args.junk} junk documents of each kind per language")
    print("\nclean documents kept (the rest: reason counts)")
    for lang in ("zh", "en", "code"):
        c = outcome[(lang, "clean")]
        total = sum(c.values())
        others = ", ".join(f"{r} {n}" for r, n in c.most_common() if r != "kept")
        unique = total - c["exact_duplicate"] - c["near_duplicate"]  # copies in the source itself
        print(f"  {lang:<5} {c['kept']}/{total} = {c['kept'] / total:.1%}; of the unique ones "
              f"{c['kept']}/{unique} = {c['kept'] / unique:.1%}   {others}")
    print("\nplanted junk removed")
    for kind in ("boilerplate", "repeated_lines", "mojibake", "near_duplicate"):
        row = []
        for lang in ("zh", "en"):
            c = outcome[(lang, kind)]
            total = sum(c.values())
            row.append(f"{lang} {total - c['kept']}/{total} = {(total - c['kept']) / max(total, 1):.0%}")
        print(f"  {kind:<15} " + "   ".join(row))
    from llmforge.data.dedup import char_shingles, shingles
    for lang, grams in (("zh", lambda t: char_shingles(t, 5)), ("en", lambda t: shingles(t, 5))):
        pairs = [(t, near_copy(t, lang, random.Random(1))) for t in (zh if lang == "zh" else en)[:200]]
        js = sorted(len(grams(a) & grams(b)) / len(grams(a) | grams(b)) for a, b in pairs)
        print(f"  near_duplicate {lang}: true shingle Jaccard median {js[len(js) // 2]:.2f}, 10th percentile "
              f"{js[len(js) // 10]:.2f} (MinHash LSH threshold 0.8)")
    print("\nthroughput of language ID + cleaning + dedup (one process)")
    for lang in ("zh", "en", "code"):
        print(f"  {lang:<5} {nbytes[lang] / 1e6:6.2f} MB in {seconds[lang]:6.2f} s = {nbytes[lang] / 1e6 / seconds[lang]:.2f} MB/s")

    from llmforge.tokenizer.bpe import Tokenizer
    from llmforge.tokenizer.report import fertility, reference_tokenizer
    train, test = {}, {}
    for lang, docs in kept_docs.items():
        docs = docs[:]
        rng.shuffle(docs)
        cut = max(1, len(docs) // 10)
        test[lang], train[lang] = docs[:cut], docs[cut:]
    mix = [t for docs in train.values() for t in docs]
    rng.shuffle(mix)
    started = time.perf_counter()
    tok = Tokenizer.train(mix, args.vocab, whole_numbers=True, cjk_chunk=4)
    train_s = time.perf_counter() - started
    ref = reference_tokenizer()
    print(f"\nBPE vocab {args.vocab} trained on the kept mixture ({sum(len(t.encode()) for t in mix) / 1e6:.1f} MB, "
          f"{train_s:.0f} s); held-out 10% per language")
    rows = {}
    for lang in ("zh", "en", "code"):
        started = time.perf_counter()
        f = fertility(tok.encode_batch, test[lang])
        enc_s = time.perf_counter() - started
        rows[lang] = f
        line = (f"  {lang:<5} bytes/token {f['bytes_per_token']:.2f}  tokens/char {f['tokens_per_char']:.3f}  "
                f"tokens/byte {f['tokens_per_byte']:.3f}  tokenize {f['bytes'] / 1e6 / enc_s:.1f} MB/s")
        if ref:
            r = fertility(lambda b: [e.ids for e in ref[1].encode_batch(b, add_special_tokens=False)], test[lang])
            line += f"   | {ref[0]} bytes/token {r['bytes_per_token']:.2f}"
        print(line)
    print(f"  zh / en bytes per token: {rows['zh']['bytes_per_token'] / rows['en']['bytes_per_token']:.2f} "
          "(target: within 20%, i.e. 0.80-1.20)")


if __name__ == "__main__":
    main()
