#!/usr/bin/env bash
# Reproduce every table and plot of docs/low-rank.md (about 35 minutes on 2 busy CPU cores).
# Order matters: experiments 1, 3 and 4 compare against experiment 2's full fine-tunes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python experiments/full_finetune_spectrum.py   # 2: spectrum of a full fine-tune's ΔW
python experiments/lora_rank.py                # 3: LoRA r = 1, 4, 16, 64 vs full
python experiments/placement.py                # 4: all linear at low r vs q/v at high r
python experiments/intrinsic_dimension.py      # 1: d90 by random-subspace training (SAID)
