"""The settings of experiments/smollm2_rank.py (model, steps, batch, lengths, learning rates, the
LoRA placements), in their own module so smollm2_report.py can record them without importing the
experiment (which imports the report)."""

from __future__ import annotations

MODEL = "smollm2-135m-instruct"
STEPS, BATCH, MAX_LENGTH, EVAL_SIZE = 30, 8, 96, 200
FULL_LR, LORA_LR = 5e-5, 1e-3
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {  # key: (target modules, rank); None = full fine-tuning
    "full": None,
    "r1": (SEVEN, 1),
    "r4": (SEVEN, 4),
    "r16": (SEVEN, 16),
    "qv_r21": (["q_proj", "v_proj"], 21),
}
