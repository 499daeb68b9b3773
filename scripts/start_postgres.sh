#!/usr/bin/env bash
# A scratch PostgreSQL on loopback for the feedback store's Postgres test. Prints the URL to use
# as LLMFORGE_TEST_POSTGRES_URL; exits non-zero (and the test skips) where it cannot be had.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || exit 1
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >/dev/null 2>&1
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_lsclusters -h | grep -q "^$version main" || pg_createcluster "$version" main >/dev/null 2>&1
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true
su postgres -c "psql -qtc \"SELECT 1 FROM pg_roles WHERE rolname='llmforge'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE llmforge LOGIN PASSWORD 'llmforge'\"" >/dev/null
su postgres -c "psql -qtc \"SELECT 1 FROM pg_database WHERE datname='feedback'\"" | grep -q 1 ||
  su postgres -c "createdb -O llmforge feedback" >/dev/null
echo "postgresql://llmforge:llmforge@127.0.0.1/feedback"
