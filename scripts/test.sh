#!/usr/bin/env bash
# The test command (README and CI): starts the scratch PostgreSQL when it is installed, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
if url=$(bash scripts/start_postgres.sh 2>/dev/null | tail -n 1) && [[ "$url" == postgresql://* ]]; then
  export LLMFORGE_TEST_POSTGRES_URL="$url"
fi
python -m pytest -q "$@"
