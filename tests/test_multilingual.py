"""Multilingual data: language ID, cleaning rules per script, character shingles, language
filters and weights, bad input, the licence filter (issue 11)."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from llmforge.config import SourceConfig, resolve
from llmforge.data.clean import clean_document
from llmforge.data.dedup import Deduplicator
from llmforge.data.langid import language, script_family
from llmforge.data.sources import iter_documents, roff_to_text
from llmforge.errors import UserError
from llmforge.run import RunDir

# Hand-written samples (not copied from anywhere): clean prose in each script.
ZH = """分词器把原始文本切成语言模型可以计数和学习的片段。字节级的词表能够表示任何字符串，包括表情符号和少见的文字。
合并规则是贪心地学出来的，每一步都把出现次数最多的相邻符号对连在一起。训练数据要先清洗，因为质量差的网页会让模型学到坏习惯。
重复的文档会被删除，这样模型就不会死记硬背同样的内容。混合数据里的每个来源都有一个权重，决定训练时看到它的次数。
验证集按哈希值划分，所以每次运行的划分都保持稳定。分片是存放词元编号的平面文件，训练循环通过内存映射来读取它们。
"""
ZH_2 = """中文网页的清洗规则要按字符来统计，而不是按空格分开的单词。一句中文在空格看来只是一个很长的词，所以英文的规则会把整页都删掉。
我们统计非空白字符的数量、汉字所占的比例、标点和符号的比例，以及重复的行和重复的字符片段。每条规则都有自己的原因代码。
近似去重也改用字符片段：把每五个相邻的字符当作一个片段，再用最小哈希估计两篇文档的相似度，找出只改了几个字的副本。
"""
ZH_TRAD = """繁體中文和簡體中文都記為同一種語言，系統不會自動轉換字形。同一段文字的兩種寫法是不同的字串，所以去重會把兩份都保留下來。
如果使用者只想要其中一種寫法，可以在資料來源裡用語言篩選，或者事先用轉換工具把整個語料統一成一種字形，再交給資料管線處理。
"""
JA = """トークナイザーは生のテキストを、言語モデルが数えて学べる小さな単位に分けます。バイト単位の語彙なら、絵文字や珍しい文字も含めて
どんな文字列でも表せます。結合の規則は貪欲に学ばれ、毎回もっとも頻度の高い隣り合う記号の組を一つにまとめます。学習データは先に
きれいにしておきます。質の悪いページはモデルに悪い癖を教えてしまうからです。重複した文書は取り除かれます。
"""
EN = """Tokenizers split raw text into pieces that a language model can count and learn from.
A byte level vocabulary can represent every string, including emoji and rare scripts.
Merges are learned greedily, always joining the most frequent adjacent pair of symbols.
Training data is cleaned first, because noisy pages teach the model noisy habits.
Duplicated documents are removed so that the model does not memorize repeated text.
Each source in the mixture gets a weight that says how often it should be seen.
Validation documents are held out by hash, which keeps the split stable across runs.
"""
ISSUE_PARAGRAPH = (ZH + ZH_2 + ZH_TRAD + "最后，我们把每一步的结果都写进报告里，方便以后查看和比较。").replace("\n", "")[:534]  # the issue's report: a 534-character paragraph


def _mojibake(text: str) -> str:
    return text.encode("utf-8").decode("cp1252", errors="replace")


# ------------------------------------------------------------------ language ID

@pytest.mark.parametrize("text, lang, family", [
    (ZH, "zh", "chars"), (ZH_TRAD, "zh", "chars"), (JA, "ja", "chars"), (EN, "en", "words"),
    ("이것은 한국어로 쓴 문장입니다. 데이터 정제 규칙은 문자 단위로 셉니다.", "ko", "chars"),
    ("นี่คือประโยคภาษาไทยที่เขียนขึ้นเพื่อทดสอบการระบุภาษา", "th", "chars"),
    ("Ceci est une phrase écrite en français pour vérifier l'identification de la langue.", "fr", "words"),
])
def test_language_and_script_family(text, lang, family):
    assert language(text) == lang
    assert script_family(text) == family


# ------------------------------------------------------------------ cleaning per script

@pytest.mark.parametrize("text", [ZH, ZH_2, ZH_TRAD, JA, ISSUE_PARAGRAPH])
def test_clean_cjk_prose_is_kept(text):
    assert clean_document(text) == (text, "kept")


def test_the_issue_paragraph_was_dropped_by_word_rules_and_is_kept_now():
    assert len(ISSUE_PARAGRAPH) == 534
    assert clean_document(ISSUE_PARAGRAPH, family="words") == (None, "too_few_words")  # the bug
    assert clean_document(ISSUE_PARAGRAPH)[1] == "kept"


@pytest.mark.parametrize("text, reason", [
    ("这是一个很短的句子。", "too_few_chars"),
    (_mojibake(ZH), "mojibake"),
    (ZH + "".join(f"版权所有 © 2024 某某网站 第{i}页 隐私政策\n" for i in range(12)), "boilerplate"),
    (ZH_2 + "2024-01-01 12:30:45 | 3.14159\n" * 60, "low_script_share"),
    (ZH + "！！！？？？★★★☆☆☆【】【】《》《》……" * 12, "punct_ratio"),
    (ZH + "价格表：" + " ".join(f"{1000 + i}.{i:02d}元" for i in range(80)), "digit_ratio"),
    ("".join(f"{i}. 第{i}条新闻的标题和一句简短的说明文字在这里\n" for i in range(15)), "bullet_lines"),
    (ZH + "欢迎光临本店，全场商品特价优惠，欢迎选购！\n" * 10, "duplicate_lines"),
    ("".join(f"欢迎光临本店全场商品特价优惠欢迎选购第{i}号商品马上下单立即发货\n" for i in range(12)), "repeated_ngrams"),
    ("".join(f"第{i}章讲了一个很长的故事，后面还有很多你意想不到的精彩内容……\n" for i in range(10)), "ellipsis_lines"),
    ("これは短い文です。", "too_few_chars"),
    (_mojibake(JA), "mojibake"),
    (JA + "今すぐ登録して限定セールをチェックしよう！お得な情報が満載です！\n" * 10, "duplicate_lines"),
    (JA + "".join(f"プライバシーポリシー | 利用規約 | 著作権 2024 サイト{i}\n" for i in range(12)), "boilerplate"),
])
def test_each_character_rule_removes_its_kind(text, reason):
    assert clean_document(text) == (None, reason)


def test_english_mojibake_is_dropped_and_english_rules_are_unchanged():
    assert clean_document(EN + EN.replace("text", "text’s")) [1] == "duplicate_lines"  # Gopher's rule still first
    assert clean_document(_mojibake(EN.replace("text", "text’s “quoted”")))[1] == "mojibake"
    assert clean_document(EN) == (EN, "kept")


def test_a_few_chinese_boilerplate_lines_are_cut_and_the_page_kept():
    text, reason = clean_document(ZH + "版权所有 © 2024 示例网站\n")
    assert reason == "kept" and text == ZH


# ------------------------------------------------------------------ near-dedup on characters

def _edit_every_fifth_clause(text: str) -> str:
    """Change one character in every fifth clause (between ， and 。): every window of five
    clauses, i.e. every 5-"word" shingle, has an edit; ~7% of the 5-character shingles do."""
    parts = re.split(r"([，。])", text)
    for i in range(0, len(parts), 10):  # parts alternate clause, delimiter
        if len(parts[i]) > 3:
            parts[i] = parts[i][:2] + ("其" if parts[i][2] != "其" else "该") + parts[i][3:]
    return "".join(parts)


def test_character_shingles_find_a_near_duplicate_chinese_pair_word_shingles_miss():
    original = ZH + ZH_2
    copy = _edit_every_fifth_clause(original)
    assert copy != original
    words = Deduplicator(exact=False, near=True)
    words.check("a", original, family="words")
    assert words.check("b", copy, family="words") is None  # every word shingle changed
    chars = Deduplicator(exact=False, near=True)
    chars.check("a", original, family="chars")
    assert chars.check("b", copy, family="chars") == "near_duplicate"
    assert chars.check("c", ZH_TRAD + JA, family="chars") is None  # a different text stays


# ------------------------------------------------------------------ prepare: languages, weights, report

def _write(folder, name, text, encoding="utf-8"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text.encode(encoding))
    return folder / name


@pytest.fixture
def bilingual(tmp_path):
    zh = [_write(tmp_path / "zh", f"{i}.txt", t) for i, t in enumerate([ZH, ZH_2, ZH_TRAD, JA])]
    en_docs = [EN + " ".join(f"word{j}x{i}" for j in range(5)) + ".\n" for i in range(6)]
    en = [_write(tmp_path / "en", f"{i}.txt", t) for i, t in enumerate(en_docs)]
    return tmp_path, zh, en


def _cfg(tmp_path, *sources, overrides=()):
    cfg = resolve("micro", overrides=["tokenizer.vocab_size=600", "data.val_fraction=0.0", *overrides])
    cfg.data.sources = list(sources)
    return cfg


def test_language_recorded_filtered_weighted_and_reported(bilingual):
    from llmforge.data.prepare import format_table, prepare
    root, zh, en = bilingual
    cfg = _cfg(root, SourceConfig(name="web", kind="files", path=f"{root}/zh,{root}/en"),
               overrides=["data.language_weights={zh = 2.0, ja = 0}"])
    run = RunDir(root / "run")
    manifest = prepare(cfg, run)
    docs = [json.loads(line) for line in open(run.data / "docs.jsonl", encoding="utf-8")]
    by_lang = {d["lang"] for d in docs}
    assert by_lang == {"zh", "ja", "en"}
    copies = {d["lang"]: d["copies"] for d in docs}
    assert copies == {"zh": 2, "ja": 0, "en": 1}  # source weight 1 x language weight
    langs = manifest["languages"]
    # before the mixture: every unique document once; after: the copies training sees
    assert langs["ja"]["tokens_train_natural"] > 0 and langs["ja"].get("tokens_train", 0) == 0
    assert langs["zh"]["tokens_train"] == 2 * langs["zh"]["tokens_train_natural"]
    assert langs["en"]["tokens_train"] == langs["en"]["tokens_train_natural"]
    assert langs["zh"]["share_after"] > langs["zh"]["share_before"]
    assert abs(sum(r["share_before"] for r in langs.values()) - 1) < 1e-3
    table = format_table(manifest)
    assert "language" in table and "zh" in table and "share" in table

    # a languages filter keeps only its languages; the others are counted
    cfg = _cfg(root, SourceConfig(name="web", kind="files", path=f"{root}/zh,{root}/en", languages=["zh"]))
    manifest = prepare(cfg, RunDir(root / "run_zh"))
    assert set(manifest["languages"]) == {"zh", "ja", "en"}
    assert manifest["removed"]["web"]["language_filtered"] == 1 + len(en)
    assert manifest["sources"]["web"]["docs_dedup"] == len(zh) - 1


def test_a_language_filter_that_keeps_nothing_is_one_clear_error(bilingual):
    from llmforge.data.prepare import prepare
    root, zh, en = bilingual
    cfg = _cfg(root, SourceConfig(name="english", kind="files", path=f"{root}/en", languages=["cn"]))
    run = RunDir(root / "run")
    with pytest.raises(UserError, match=r"source 'english': the filter languages = \['cn'\] keeps none of its 6 "
                                        r"documents \(found: en 6\); fix the codes"):
        prepare(cfg, run)
    assert not (run.data / "docs.jsonl").exists()
    assert not [p for p in run.data.iterdir() if p.name.endswith(".tmp")]


def test_bad_language_weight_is_a_user_error(bilingual):
    from llmforge.data.prepare import prepare
    root, zh, en = bilingual
    cfg = _cfg(root, SourceConfig(name="en", kind="files", path=f"{root}/en"), overrides=["data.language_weights.en=lots"])
    with pytest.raises(UserError, match="data.language_weights.en = 'lots' is not a number"):
        prepare(cfg, RunDir(root / "run"))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("content, match", [
    (ZH.encode("gb18030"), r"is not UTF-8 \(bad byte at offset 0, line 1\); it looks like gb18030: set the source's "
                           r"encoding = \"gb18030\""),
    (ZH.encode("utf-8") + ZH_2.encode("gb18030"), r"mixes encodings: valid UTF-8 up to byte \d+ \(line 5\)"),
    (b"", r"is empty; delete it or leave it out of data source 'mine'"),
    (ZH.encode("utf-16"), r"is not UTF-8 \(bad byte at offset 0, line 1\); it looks like utf-16: set the source's "
                          r"encoding = \"utf-16\""),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), r"is binary \(NUL byte at offset 8\), not .txt text"),
])
def test_bad_files_are_one_clear_line_and_leave_nothing_behind(tmp_path, content, match):
    from llmforge.data.prepare import prepare
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a_good.txt").write_text(EN)
    (tmp_path / "corpus" / "b_bad.txt").write_bytes(content)
    cfg = _cfg(tmp_path, SourceConfig(name="mine", kind="files", path=str(tmp_path / "corpus")))
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match=r"b_bad\.txt " + match):
        prepare(cfg, run)
    assert not (run.data / "docs.jsonl").exists()
    assert not [p for p in run.data.iterdir() if p.name.endswith(".tmp")]


def test_encoding_setting_reads_gb18030(tmp_path):
    path = _write(tmp_path / "gbk", "a.txt", ZH, encoding="gb18030")
    docs = list(iter_documents(SourceConfig(name="gbk", kind="files", path=str(path), encoding="gb18030")))
    assert docs[0]["text"] == ZH
    with pytest.raises(UserError, match="unknown encoding 'klingon'"):
        list(iter_documents(SourceConfig(name="gbk", kind="files", path=str(path), encoding="klingon")))


# ------------------------------------------------------------------ manual pages

def test_roff_to_text_keeps_the_prose_and_drops_the_markup():
    page = ('.\\" comment\n.TH LS 1\n.SH 名称\nls \\- 列出目录内容\n.SH 描述\n.PP\n列出 \\fB文件\\fP 的信息。\n'
            ".TP\n.if  !'po4a'hide' .BR \\-a \", \" \\-\\-all\n不忽略以 . 开头的项目。\n")
    assert roff_to_text(page) == "名称\nls - 列出目录内容\n\n描述\n\n列出 文件 的信息。\n\n-a, --all\n不忽略以 . 开头的项目。\n"


def test_manpages_source_is_a_clear_error_when_not_installed(tmp_path):
    with pytest.raises(UserError, match=r"no manual pages in .*nowhere; install them .*apt-get install manpages-zh"):
        list(iter_documents(SourceConfig(name="zh", kind="manpages", path=str(tmp_path / "nowhere"))))


def test_manpages_source_reads_gzipped_pages(tmp_path):
    import gzip
    (tmp_path / "zz" / "man1").mkdir(parents=True)
    (tmp_path / "zz" / "man1" / "demo.1.gz").write_bytes(gzip.compress((".TH DEMO 1\n.SH 描述\n" + ZH).encode()))
    (tmp_path / "zz" / "man1" / "link.1.gz").write_bytes(gzip.compress(b".so man1/demo.1\n"))
    docs = list(iter_documents(SourceConfig(name="zh", kind="manpages", path=str(tmp_path / "zz"))))
    assert len(docs) == 1 and docs[0]["text"].startswith("描述\n分词器") and language(docs[0]["text"]) == "zh"


# ------------------------------------------------------------------ datatrove path

def _junk_corpus(root):
    """Clean zh / ja / en / code documents plus planted junk and near-duplicates of each."""
    _write(root / "zh", "a.txt", ZH + ZH_2)
    _write(root / "zh", "c.txt", ZH_TRAD)
    _write(root / "zh", "d.txt", JA)
    _write(root / "zh", "e_near.txt", _edit_every_fifth_clause(ZH + ZH_2))
    _write(root / "zh", "f_moji.txt", _mojibake(ZH_2))
    _write(root / "zh", "g_spam.txt", ZH + "欢迎光临本店，全场商品特价优惠，欢迎选购！\n" * 10)
    _write(root / "zh", "h_short.txt", "这是一个很短的句子。")
    for i in range(4):
        _write(root / "en", f"{i}.txt", EN + " ".join(f"word{j}x{i}" for j in range(5)) + ".\n")
    _write(root / "en", "m_moji.txt", _mojibake(EN.replace("text", "text’s")))
    _write(root / "en", "n_copy.txt", EN.upper() + " ".join(f"word{j}x0" for j in range(5)).upper() + ".\n")
    _write(root / "code", "a.py", "import math\n\n\ndef area(r):\n    return math.pi * r ** 2  # circle\n" * 2)
    _write(root / "code", "b.py", "def f(x):\n    '''Identity.'''\n    return x\n\n\nclass A:\n    pass\n")


@pytest.mark.slow
def test_datatrove_path_keeps_the_same_documents_as_the_builtin_path(tmp_path):
    pytest.importorskip("datatrove")
    from llmforge.data.prepare import collect_documents
    _junk_corpus(tmp_path / "corpus")
    c = tmp_path / "corpus"
    sources = [SourceConfig(name="web", kind="files", path=f"{c}/zh,{c}/en", languages=["zh", "en", "ja"]),
               SourceConfig(name="code", kind="files", path=f"{c}/code", code=True, weight=2.0)]
    results = {}
    for engine in ("builtin", "datatrove"):
        cfg = _cfg(tmp_path, *sources, overrides=[f"data.engine={engine}", "data.engine_tasks=2",
                                                   "data.val_fraction=0.2", "data.language_weights={zh = 2.0}"])
        run = RunDir(tmp_path / engine)
        run.create()
        stats = collect_documents(cfg, run)
        docs = [json.loads(line) for line in open(run.data / "docs.jsonl", encoding="utf-8")]
        results[engine] = (docs, stats)
    (builtin, b_stats), (datatrove, d_stats) = results["builtin"], results["datatrove"]
    assert [d["id"] for d in datatrove] == [d["id"] for d in builtin]
    assert datatrove == builtin
    assert d_stats["removed"] == b_stats["removed"]
    assert d_stats["sources"]["web"]["docs_dedup"] == b_stats["sources"]["web"]["docs_dedup"]
    kept = {Path(d["id"]).name for d in builtin}
    assert kept >= {"a.txt", "c.txt", "d.txt", "a.py", "b.py"}
    assert not kept & {"e_near.txt", "f_moji.txt", "g_spam.txt", "h_short.txt", "m_moji.txt", "n_copy.txt"}


# ------------------------------------------------------------------ tokenizer report, bilingual config

def test_tokenizer_report_prints_fertility_per_language(bilingual, capsys):
    from llmforge.cli import main
    from llmforge.data.prepare import prepare
    from llmforge.tokenizer import report
    from llmforge.tokenizer.bpe import Tokenizer
    root, zh, en = bilingual
    cfg = _cfg(root, SourceConfig(name="web", kind="files", path=f"{root}/zh,{root}/en"))
    run = RunDir(root / "run")
    prepare(cfg, run)
    tok = Tokenizer.load(run.tokenizer)
    pattern = json.loads(tok.hf.to_str())["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    assert "{1,4}" in pattern  # cjk_chunk auto: zh/ja documents in the mix
    capsys.readouterr()
    assert main(["tokenizer", "report", "--out", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "tok/char" in out and "bytes/tok" in out and "relative to English" in out
    result = report.report(tok, report.sample_by_language(run.data / "docs.jsonl"))
    zh_row = result["languages"]["zh"]["ours"]
    assert set(result["languages"]) == {"zh", "ja", "en"}
    assert zh_row["tokens"] == sum(len(tok.encode(t)) for t in [ZH, ZH_2, ZH_TRAD])
    assert zh_row["bytes_per_token"] == pytest.approx(1 / zh_row["tokens_per_byte"])
    assert not (run.root / "config.toml").exists()  # the report only reads the run: no config recorded


@pytest.mark.slow
def test_bilingual_sample_config_prepares_out_of_the_box(tmp_path):
    from llmforge.config import resolve as resolve_cfg
    from llmforge.data.prepare import prepare
    from llmforge.data.sources import MAN_ROOT
    if not (MAN_ROOT / "zh_CN").is_dir():
        pytest.skip("Chinese manual pages not installed (apt-get install manpages-zh; scripts/setup.sh does it)")
    config = Path(__file__).parent.parent / "llmforge" / "data" / "bilingual.toml"
    cfg = resolve_cfg("micro", str(config), ["tokenizer.vocab_size=800"])
    for src, cap in zip(cfg.data.sources, (40, 30, 60)):
        src.max_docs = cap
    manifest = prepare(cfg, RunDir(tmp_path / "run"))
    langs = manifest["languages"]
    assert {"zh", "en", "code"} <= set(langs)
    assert langs["zh"]["docs_dedup"] >= 0.8 * 60 * 0.9   # nearly all Chinese pages kept
    assert langs["zh"]["share_after"] > langs["zh"]["share_before"]  # language_weights zh = 2


# ------------------------------------------------------------------ licence filter

MIT = """MIT License

Copyright (c) 2024 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files, to deal in the Software without restriction.
The above copyright notice and this permission notice shall be included in all copies.
"""
GPL3 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007
 Everyone is permitted to copy and distribute verbatim copies of this license document.
"""
CODE = "import os\n\n\ndef listing(path):\n    '''Names in a folder.'''\n    return sorted(os.listdir(path))\n"


def test_licence_filter_keeps_allowed_files_and_counts_drops_by_reason(tmp_path):
    from llmforge.data.prepare import collect_documents
    repo = tmp_path / "repo"
    _write(repo / "mit", "LICENSE", MIT)
    _write(repo / "mit", "a.py", CODE)
    _write(repo / "mit" / "sub", "f.py", CODE + "# nested: the LICENSE above applies\n")
    _write(repo / "gpl", "COPYING.txt", GPL3)
    _write(repo / "gpl", "b.py", CODE + "# gpl\n")
    _write(repo / "none", "c.py", CODE + "# no licence anywhere\n")
    _write(repo / "spdx", "d.py", "# SPDX-License-Identifier: Apache-2.0\n" + CODE)
    _write(repo / "spdx", "e.py", "# SPDX-License-Identifier: GPL-2.0-only OR MIT\n" + CODE + "# dual\n")
    _write(repo / "spdx", "g.py", "// SPDX-License-Identifier: GPL-3.0-or-later\n" + CODE + "# copyleft\n")
    _write(repo / "odd", "LICENSE.md", "You may do whatever you like with this, says the author.\n")
    _write(repo / "odd", "h.py", CODE + "# odd\n")
    src = SourceConfig(name="code", kind="files", path=str(repo), code=True, licenses=["permissive"])
    dropped = Counter()
    kept = sorted(Path(d["id"]).name for d in iter_documents(src, dropped))
    assert kept == ["a.py", "d.py", "e.py", "f.py"]
    assert dropped == {"license_not_allowed": 2, "license_unknown": 1, "license_unrecognized": 1, "license_file": 2}
    # an explicit allow-list; the drops reach the data report
    cfg = _cfg(tmp_path, SourceConfig(name="code", kind="files", path=str(repo), code=True,
                                      licenses=["MIT", "GPL-3.0"]), overrides=["data.dedup_near=false"])
    run = RunDir(tmp_path / "run")
    run.create()
    stats = collect_documents(cfg, run)
    assert stats["removed"]["code"]["license_not_allowed"] == 1   # d.py (Apache-2.0)
    assert stats["sources"]["code"]["docs_dedup"] == 5            # a, b, e, f, g


def test_licence_filter_that_keeps_nothing_says_why(tmp_path):
    _write(tmp_path / "none", "c.py", CODE)
    src = SourceConfig(name="code", kind="files", path=str(tmp_path / "none"), code=True, licenses=["MIT"])
    with pytest.raises(UserError, match=r"produced no documents \(licence filter: license_unknown 1\)"):
        list(iter_documents(src))
