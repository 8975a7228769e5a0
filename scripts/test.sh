#!/usr/bin/env bash
# Set up (idempotent), lint, type-check, then run the tests; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "test: ruff" >&2
.venv/bin/ruff check albatross tests benchmarks
echo "test: mypy" >&2
.venv/bin/mypy
echo "test: pytest" >&2
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
