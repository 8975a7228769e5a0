#!/usr/bin/env bash
# Set up quietly (idempotent), then run the gateway; arguments go to `albatross serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --quiet
exec .venv/bin/albatross serve "$@"
