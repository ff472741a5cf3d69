#!/usr/bin/env bash
# Install (idempotent, with test extras) and run the whole test suite on the CPU. No GPU, no model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec .venv/bin/python -m pytest tests "$@"
