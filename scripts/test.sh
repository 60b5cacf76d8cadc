#!/usr/bin/env bash
# The test command: set up (idempotent) then run the whole suite with real Redis and real Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/audit.sh          # bandit + pip-audit: real findings fail the run
exec .venv/bin/python -m pytest -q -ra "$@"
