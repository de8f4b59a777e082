#!/usr/bin/env bash
# Reproduce every table and plot of docs/low-rank.md on ONE CPU thread (about 1 h 45 min).
# Order matters: experiments 3, 4 and 5 compare against experiment 1's probe and experiment 2's
# full fine-tunes. Every sweep resumes where it stopped (results/*.runs.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python experiments/probe.py                      # 1: linear probe on the frozen embedding
python experiments/full_finetune_spectrum.py     # 2: full fine-tune and the spectrum of its ΔW
python experiments/lora_rank.py                  # 3: LoRA r = 1, 4, 16, 64 vs full
python experiments/placement.py                  # 4: all linear at low r vs q/v at high r
python experiments/intrinsic_dimension.py --seed 0   # 5: d90 by SAID, seed 0 of every d first
python experiments/intrinsic_dimension.py --seed 1
python experiments/intrinsic_dimension.py --seed 2
python experiments/probe.py                      # 1 again: adds the tuned probe (grid chosen on eval)
python experiments/lora_r64_lower_lr.py          # 3, follow-up: r = 64 at a 4x smaller lr
python experiments/smollm2_rank.py --seed 0   # 6: 2-4 on SmolLM2-135M: zero-shot, full FT, LoRA r = 1, 4, 16, q/v
python experiments/smollm2_rank.py --seed 1   # (one seed at a time: every setting has
python experiments/smollm2_rank.py --seed 2   #  seeds 0 and 1 before seed 2 starts)
