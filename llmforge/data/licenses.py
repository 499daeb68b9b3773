"""Licence filter for code read by a `files` source: keep only files whose licence is allowed.

    [[data.sources]]
    name = "mycode"
    kind = "files"
    path = "~/src/**/*.py"
    code = true
    licenses = ["permissive"]          # or SPDX ids: ["MIT", "Apache-2.0", "BSD-3-Clause"]

A file's licence is, in this order (as The Stack keeps only permissively licensed code,
Kocetkov et al. 2022):
  1. an `SPDX-License-Identifier: <expression>` line in its first 4 KB;
  2. the LICENSE / LICENCE / COPYING file in its folder, or the nearest folder above it up to
     the source's root (the folder its path or glob starts from), by an SPDX line in it or
     by the standard wording of the common licences.
An expression "A OR B" is allowed when either is, "A AND B" when both are; "-only",
"-or-later" and "+" are ignored when comparing ids. Dropped files are counted by reason:

    license_unknown       no SPDX header and no licence file found
    license_unrecognized  a licence file whose text matches none of the known licences
    license_not_allowed   a licence that is not in the allow-list
    license_file          the LICENSE.txt / COPYING.md file itself
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

PERMISSIVE = ["MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "0BSD", "Unlicense", "CC0-1.0",
              "Zlib", "PSF-2.0", "BSL-1.0"]
LICENSE_FILES = re.compile(r"^(?:licen[sc]e|copying|unlicense)(?:[._-].*)?$", re.IGNORECASE)
_SPDX = re.compile(r"SPDX-License-Identifier:\s*([A-Za-z0-9.+\-() ]+?)\s*(?:\*/|-->|$)", re.MULTILINE)

# (SPDX id, phrases that must all occur in the lowercased, whitespace-collapsed licence text);
# the first match wins, so the more specific wordings come first.
_TEXTS = [
    ("AGPL-3.0", ["gnu affero general public license"]),
    ("LGPL-3.0", ["gnu lesser general public license", "version 3"]),
    ("LGPL-2.1", ["gnu lesser general public license", "version 2.1"]),
    ("GPL-3.0", ["gnu general public license", "version 3"]),
    ("GPL-2.0", ["gnu general public license", "version 2"]),
    ("MPL-2.0", ["mozilla public license", "2.0"]),
    ("Apache-2.0", ["apache license", "version 2.0"]),
    ("MIT", ["permission is hereby granted, free of charge", "above copyright notice"]),
    ("BSD-3-Clause", ["redistribution and use in source and binary forms", "neither the name"]),
    ("BSD-2-Clause", ["redistribution and use in source and binary forms"]),
    ("ISC", ["permission to use, copy, modify, and/or distribute this software for any purpose"]),
    ("Unlicense", ["free and unencumbered software released into the public domain"]),
    ("CC0-1.0", ["cc0 1.0"]),
    ("PSF-2.0", ["python software foundation license"]),
    ("Zlib", ["altered source versions must be plainly marked", "provided 'as-is'"]),
    ("BSL-1.0", ["boost software license"]),
]


def _norm(spdx: str) -> str:
    spdx = spdx.strip().strip("()").lower()
    for suffix in ("-only", "-or-later", "+"):
        if spdx.endswith(suffix):
            spdx = spdx[: -len(suffix)]
    return spdx


def identify_text(text: str) -> str | None:
    """The SPDX id of a licence file's text, or None when it is not one we know."""
    m = _SPDX.search(text)
    if m:
        return m.group(1).strip()
    flat = " ".join(text.lower().split())
    for spdx, phrases in _TEXTS:
        if all(p in flat for p in phrases):
            return spdx
    return None


def expression_allowed(expression: str, allowed: set[str]) -> bool:
    """Whether an SPDX expression ("MIT OR Apache-2.0", "GPL-2.0 WITH Classpath-exception-2.0") is allowed."""
    for alternative in re.split(r"\s+OR\s+", expression.replace("(", " ").replace(")", " ").strip()):
        terms = [re.split(r"\s+WITH\s+", t.strip())[0] for t in re.split(r"\s+AND\s+", alternative.strip())]
        if terms and all(_norm(t) in allowed for t in terms if t):
            return True
    return False


def _roots(path_setting: str) -> list[Path]:
    """The folders a source's patterns start from (the part before the first glob character)."""
    roots = []
    for pattern in (p.strip() for p in path_setting.split(",") if p.strip()):
        pattern = str(Path(pattern).expanduser())
        base = pattern.split("*")[0].split("?")[0].split("[")[0] if glob.has_magic(pattern) else pattern
        base_path = Path(base)
        roots.append((base_path if base_path.is_dir() else base_path.parent).resolve())
    return roots


class LicenseFilter:
    """`check(path)`: None when the file may be used, else the reason code it is dropped for."""

    def __init__(self, src):
        allowed = []
        for name in src.licenses:
            allowed += PERMISSIVE if name.lower() == "permissive" else [name]
        self.allowed = {_norm(a) for a in allowed}
        self.roots = _roots(src.path)
        self._folder: dict[Path, str | None] = {}   # folder -> licence id of the file found there ("" = unrecognized)

    def _folder_license(self, folder: Path) -> str | None:
        if folder not in self._folder:
            found = None
            for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
                if candidate.is_file() and LICENSE_FILES.match(candidate.name):
                    text = candidate.read_bytes()[:65536].decode("utf-8", errors="replace")
                    found = identify_text(text) or ""
                    if found:
                        break
            self._folder[folder] = found
        return self._folder[folder]

    def license_of(self, path: Path) -> str | None:
        """The file's SPDX expression, "" for an unrecognized licence file, None for none found."""
        head = path.read_bytes()[:4096].decode("utf-8", errors="replace")
        m = _SPDX.search(head)
        if m:
            return m.group(1).strip()
        folder = path.resolve().parent
        stop = next((r for r in self.roots if folder == r or r in folder.parents), folder)
        while True:
            found = self._folder_license(folder)
            if found is not None:
                return found
            if folder == stop or folder.parent == folder:
                return None
            folder = folder.parent

    def check(self, path: Path) -> str | None:
        if LICENSE_FILES.match(path.name):
            return "license_file"  # the licence text itself is not training data
        spdx = self.license_of(path)
        if spdx is None:
            return "license_unknown"
        if spdx == "":
            return "license_unrecognized"
        return None if expression_allowed(spdx, self.allowed) else "license_not_allowed"
