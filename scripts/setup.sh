#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu machine with Python 3.11:
#   - Debian packages: redis-server, python3.11-venv, chromium (the review queue's browser test)
#   - .venv made from the SYSTEM python3.11: Triton's Python backend stub (from nvidia-pytriton)
#     links the system libpython3.11, so the venv's standard library must be the same one
#   - the project with its training, serving, test and scale-out (Ray) extras, pinned by constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
[ -x /usr/bin/python3.11 ] || need_apt+=(python3.11)
/usr/bin/python3.11 -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3.11-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# the review queue's end-to-end test drives Debian's chromium with Playwright (tests/test_review_browser.py;
# Playwright's own browser download, `playwright install`, is never used). Not fatal: without it that
# test is skipped and says why
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] apt-get install chromium (for the review queue's browser test)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "[setup] WARNING: chromium not installed; tests/test_review_browser.py will be skipped" >&2
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null; then
  echo "[setup] creating .venv from /usr/bin/python3.11"
  rm -rf .venv
  /usr/bin/python3.11 -m venv .venv
fi
stamp=.venv/.seqguard-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing seqguard and its pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade "pip>=24"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[train,serve,dev,scale]"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python --version), redis $(redis-server --version | awk '{print $3}')"
