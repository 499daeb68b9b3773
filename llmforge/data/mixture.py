"""The data mixture: which split a document belongs to and how often training sees it.

Split: a document goes to validation when the hash of its normalized text falls below
`val_fraction`. The hash, not the position, decides, so the split does not change when
sources are added or reordered, and two copies of a text always land on the same side
(no train/val leakage even with dedup off).

Weights, read as epochs per source (Llama-style: small high-quality sources are repeated,
Touvron et al. 2023, table 2): a training document of a source with weight w is included
floor(w) times, plus once more with probability frac(w). The coin is a hash of
(seed, document), so the result is deterministic and independent of document order.
Weight 2.0 = every document twice; 0.5 = a fixed random half of them. Validation
documents are included exactly once, whatever the weight, so val loss measures the
natural distribution.
"""
from __future__ import annotations

import hashlib
import math


def unit_hash(*parts) -> float:
    """A deterministic number in [0, 1) from any strings/ints."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_of(doc_key: str, val_fraction: float) -> str:
    """"val" or "train" for the document whose exact_key is `doc_key`."""
    return "val" if unit_hash("split", doc_key) < val_fraction else "train"


def copies(weight: float, doc_key: str, seed: int, split: str = "train") -> int:
    """How many times this document appears in `split`."""
    if weight <= 0:
        return 0
    if split == "val":
        return 1
    whole = math.floor(weight)
    return whole + (1 if unit_hash("copy", seed, doc_key) < weight - whole else 0)
