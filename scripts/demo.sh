#!/usr/bin/env bash
# The demo command: set up (idempotent), then generate -> train -> up -> stream -> report -> stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/seqguard demo "$@"
