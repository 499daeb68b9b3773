"""Step 1 of `llmforge data prepare` (read, language ID, clean, dedup, mix) as a datatrove pipeline.

    llmforge data prepare --out runs/big --config my.toml --set data.engine=datatrove --set data.engine_tasks=8

datatrove (Penedo et al., the FineWeb pipeline library) runs a list of steps per task on a
LocalPipelineExecutor here, and the same steps on its SlurmPipelineExecutor or
RayPipelineExecutor for a corpus of real size. Two pipelines, the second depending on the first:

  1. `engine_tasks` parallel tasks: read the sources (document k goes to task k mod tasks),
     language ID, the source's `languages` filter, the cleaning rules of data/clean.py;
     each task writes its kept documents to clean/NNNNN.jsonl.
  2. one task: merge the task files back into the sources' order, deduplicate (exact +
     MinHash, data/dedup.py: the first copy seen is kept, so the order matters), assign
     split and copies (data/mixture.py) and write data/docs.jsonl.

The steps call the same functions as the built-in path, so both keep the same documents
(tests/test_multilingual.py checks it); tokenization and shards stay with prepare.py's
process pool. For corpora whose dedup index does not fit one machine, datatrove's own
MinhashDedupSignature/Buckets/Cluster/Filter stages replace step 2's dedup (a different
MinHash, so its kept set differs slightly from the built-in one).
"""
from __future__ import annotations

import heapq
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from llmforge.config import Config
from llmforge.data import mixture
from llmforge.data.clean import clean_document
from llmforge.data.dedup import Deduplicator, exact_key
from llmforge.data.langid import CHAR_LANGUAGES, language
from llmforge.data.sources import iter_documents


class SourcesReader(PipelineStep):
    """Every source's documents, in config order; task `rank` of `world_size` takes every
    world_size-th one. metadata: source, n (position in the whole corpus), lang."""
    name, type = "llmforge sources", "📖 - READER"

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        n = 0
        for src in self.cfg.data.sources:
            dropped = Counter()
            for doc in iter_documents(src, dropped):
                if n % world_size == rank:
                    self.stat_update("documents")
                    lang = "code" if src.code else language(doc["text"])
                    yield Document(text=doc["text"], id=doc["id"], metadata={"source": src.name, "n": n, "lang": lang})
                n += 1
            if rank == 0:
                for reason, count in dropped.items():
                    self.stat_update(f"dropped_{src.name}/{reason}", value=count)


class LanguageFilter(BaseFilter):
    name = "llmforge languages"

    def __init__(self, cfg: Config):
        super().__init__()
        self.wanted = {s.name: set(s.languages) for s in cfg.data.sources}

    def filter(self, doc: Document):
        wanted = self.wanted[doc.metadata["source"]]
        if wanted and doc.metadata["lang"] not in wanted:
            return False, f"{doc.metadata['source']}/language_filtered"
        return True


class QualityFilter(BaseFilter):
    """data/clean.py's rules (per script); a kept document's text is its cleaned text."""
    name = "llmforge clean"

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.code = {s.name: s.code for s in cfg.data.sources}

    def filter(self, doc: Document):
        family = "chars" if doc.metadata["lang"] in CHAR_LANGUAGES else "words"
        text, reason = clean_document(doc.text, code=self.code[doc.metadata["source"]], rules=self.cfg.data.clean,
                                      char_rules=self.cfg.data.clean_chars, family=family)
        if text is None:
            return False, f"{doc.metadata['source']}/{reason}"
        doc.text = text
        return True


class TaskWriter(PipelineStep):
    """Stage 1's output: one JSONL file per task, in the task's (increasing n) order."""
    name, type = "llmforge task writer", "💽 - WRITER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for doc in data:
                f.write(json.dumps({"id": doc.id, "text": doc.text, **doc.metadata}, ensure_ascii=False) + "\n")
                yield doc


class MergedReader(PipelineStep):
    """Stage 2's input: the task files merged back into corpus order (by n), streaming."""
    name, type = "llmforge merged reader", "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        def rows(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)
        files = sorted(Path(self.folder).glob("*.jsonl"))
        for row in heapq.merge(*(rows(p) for p in files), key=lambda r: r["n"]):
            text, doc_id = row.pop("text"), row.pop("id")
            yield Document(text=text, id=doc_id, metadata=row)


class DedupFilter(BaseFilter):
    """data/dedup.py's exact + MinHash dedup; must run in one task, in corpus order."""
    name = "llmforge dedup"

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.data
        self.args = (d.dedup_exact, d.dedup_near, d.near_threshold, d.num_perm, d.shingle_words, d.shingle_chars)
        self.dd = None
        self.checked = 0

    def filter(self, doc: Document):
        if self.dd is None:
            self.dd = Deduplicator(*self.args)
        self.checked += 1
        doc.metadata["key"] = exact_key(doc.text)
        family = "chars" if doc.metadata["lang"] in CHAR_LANGUAGES else "words"
        duplicate = self.dd.check(str(self.checked), doc.text, doc.metadata["key"], family=family)
        return (False, f"{doc.metadata['source']}/{duplicate}") if duplicate else True


class DocsWriter(PipelineStep):
    """Split and copies (source weight x language weight), written as prepare.py's docs.jsonl."""
    name, type = "llmforge docs writer", "💽 - WRITER"

    def __init__(self, cfg: Config, path: str, language_weights: dict):
        super().__init__()
        self.cfg, self.path, self.lang_weights = cfg, path, language_weights
        self.weight = {s.name: s.weight for s in cfg.data.sources}

    def run(self, data, rank: int = 0, world_size: int = 1):
        with open(self.path, "w", encoding="utf-8") as f:
            for doc in data:
                m = doc.metadata
                split = mixture.split_of(m["key"], self.cfg.data.val_fraction)
                weight = self.weight[m["source"]] * self.lang_weights.get(m["lang"], 1.0)
                copies = mixture.copies(weight, m["key"], self.cfg.data.seed, split)
                f.write(json.dumps({"id": doc.id, "source": m["source"], "lang": m["lang"], "split": split,
                                    "copies": copies, "text": doc.text}, ensure_ascii=False) + "\n")
                self.stat_update("documents")
                yield doc


def _removed(stats_path: Path) -> dict[str, Counter]:
    """{source: {reason: count}} from datatrove's merged stats.json (keys "dropped_SOURCE/REASON")."""
    removed: dict[str, Counter] = defaultdict(Counter)

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, str) and k.startswith("dropped_") and "/" in k:
                    source, reason = k[len("dropped_"):].split("/", 1)
                    removed[source][reason] += v["total"] if isinstance(v, dict) else v
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
    if stats_path.is_file():
        walk(json.loads(stats_path.read_text()))
    return removed


def collect(cfg: Config, docs_path: Path, tasks: int, language_weights: dict) -> dict[str, Counter]:
    """Run both pipelines; write docs.jsonl at `docs_path` (the caller's temp name) and return
    the removals per source and reason."""
    work = Path(tempfile.mkdtemp(prefix=".datatrove.", dir=docs_path.parent))
    try:
        (work / "clean").mkdir()
        stage1 = LocalPipelineExecutor(
            [SourcesReader(cfg), LanguageFilter(cfg), QualityFilter(cfg), TaskWriter(str(work / "clean"))],
            tasks=tasks, workers=tasks, logging_dir=str(work / "logs1"), skip_completed=False, start_method="spawn")
        stage2 = LocalPipelineExecutor(
            [MergedReader(str(work / "clean")), DedupFilter(cfg), DocsWriter(cfg, str(docs_path), language_weights)],
            tasks=1, logging_dir=str(work / "logs2"), depends=stage1, skip_completed=False)
        stage2.run()
        removed = _removed(work / "logs1" / "stats.json")
        for source, counts in _removed(work / "logs2" / "stats.json").items():
            removed[source].update(counts)
        return removed
    finally:
        shutil.rmtree(work, ignore_errors=True)
