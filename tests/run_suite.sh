#!/usr/bin/env bash
# Runs the whole suite twice: on SQLite (the embedded default) and on PostgreSQL.
# With CI=true an unreachable PostgreSQL fails the run; elsewhere it is reported loudly and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
read -r -a extra <<< "${PYTEST_ARGS:-}"
status=0

echo "=== pytest on SQLite ==="
DATABASE_URL="sqlite:///$PWD/var/app-under-test.sqlite3" "$PY" -m pytest "${extra[@]}" || status=1

echo "=== pytest on PostgreSQL ($TEST_DATABASE_URL) ==="
if "$PY" - "$TEST_DATABASE_URL" <<'PYEOF'
import sys, psycopg, dj_database_url
cfg = dj_database_url.parse(sys.argv[1])
psycopg.connect(host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"], password=cfg["PASSWORD"] or None, dbname=cfg["NAME"], connect_timeout=5).close()
PYEOF
then
    DATABASE_URL="$TEST_DATABASE_URL" "$PY" -m pytest "${extra[@]}" || status=1
elif [ "${CI:-}" = "true" ]; then
    echo "PostgreSQL at $TEST_DATABASE_URL is unreachable and CI=true: failing." >&2
    status=1
else
    echo "WARNING: PostgreSQL at $TEST_DATABASE_URL is unreachable: the PostgreSQL pass did NOT run." >&2
    status=1
fi
exit $status
