#!/usr/bin/env bash
# The whole test suite, from a fresh clone: makes .venv (Python 3.11+), installs the package
# with its dev extra (torch==2.13.0 CPU is enough), runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev]'
cp pyproject.toml .venv/nanochat-pyproject.toml  # what .venv holds: the main job installs again only when this differs
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; fi
export WANDB_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
