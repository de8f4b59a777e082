"""The seed article's code samples, copied verbatim (from ``shared/seed/000_8f250bc7f8b92240.txt``),
and how the tests run them.

``adapt`` turns a sample into runnable code (``peft`` -> the package under test in the imports,
the hub id and placeholder paths -> local directories); ``run`` executes it. Used by
tests/test_seed_snippets.py and tests/test_trl.py.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

LORA_LINEAR_SNIPPET = '''
import torch
import torch.nn as nn

class LoRALinear(nn.Module):
    """A linear layer with a frozen base weight and a trainable low-rank adapter."""
    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 8.0):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha

        d, k = base_layer.out_features, base_layer.in_features

        # Freeze the base weight — no gradients, no optimizer states
        self.base_layer.weight.requires_grad = False
        if self.base_layer.bias is not None:
            self.base_layer.bias.requires_grad = False

        # A: down-projection (r x k), Gaussian init
        self.A = nn.Parameter(torch.randn(r, k) * 0.01)
        # B: up-projection (d x r), zero init
        self.B = nn.Parameter(torch.zeros(d, r))

    def forward(self, x):
        # Original frozen computation
        base_out = self.base_layer(x)
        # Low-rank bypass: (alpha/r) * x @ A^T @ B^T
        lora_out = (self.alpha / self.r) * (x @ self.A.T @ self.B.T)
        return base_out + lora_out

# Create a base linear layer (e.g., d=512, k=256)
base = nn.Linear(256, 512, bias=False)
lora = LoRALinear(base, r=8, alpha=8.0)

# Count parameters
total = sum(p.numel() for p in lora.parameters())
trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
frozen = total - trainable

print(f"Base weight shape: {base.weight.shape}  (d=512, k=256)")
print(f"A shape: {lora.A.shape}  (r=8, k=256)")
print(f"B shape: {lora.B.shape}  (d=512, r=8)")
print(f"\\nTotal parameters:     {total:,}")
print(f"Frozen (base W0):     {frozen:,}")
print(f"Trainable (A + B):    {trainable:,}")
print(f"Compression ratio:    {frozen / trainable:.1f}x")

# Verify that delta W = BA = 0 at initialization
delta_W = (lora.alpha / lora.r) * lora.B @ lora.A
print(f"\\nDelta W at init (should be all zeros): max|BA| = {delta_W.abs().max().item():.6f}")
'''

CONFIG_SNIPPET = """
from peft import LoraConfig, get_peft_model, TaskType
from transformers import AutoModelForCausalLM

# 1. Load a pre-trained model
model = AutoModelForCausalLM.from_pretrained(
    "meta-llama/Llama-2-7b-hf",
    torch_dtype=torch.float16,
    device_map="auto",
)

# 2. Configure LoRA
lora_config = LoraConfig(
    r=16,                          # Rank — capacity of the adapter
    lora_alpha=32,                 # Scaling: alpha/r = 32/16 = 2.0
    target_modules=[               # Which layers get LoRA adapters
        "q_proj", "k_proj",
        "v_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj",
    ],
    lora_dropout=0.05,             # Dropout on the LoRA path for regularisation
    bias="none",                   # Don't train biases
    task_type=TaskType.CAUSAL_LM,  # Tells PEFT this is autoregressive LM
)

# 3. Wrap the model with LoRA adapters
peft_model = get_peft_model(model, lora_config)

# 4. Inspect trainable parameters
peft_model.print_trainable_parameters()
# => trainable params: 39,976,960 || all params: 6,778,957,824 || trainable%: 0.5897
"""

MERGE_SNIPPET = """
from peft import PeftModel
from transformers import AutoModelForCausalLM

# Load base model + trained LoRA adapter
base_model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")
peft_model = PeftModel.from_pretrained(base_model, "path/to/lora-adapter")

# Merge adapter into base weights: W_merged = W0 + (alpha/r) * B @ A
merged_model = peft_model.merge_and_unload()

# merged_model is now a standard transformers model — no adapter overhead
# Save it as a regular model checkpoint
merged_model.save_pretrained("path/to/merged-model")

# Inference is identical to the base model: single matrix multiply per layer
outputs = merged_model.generate(input_ids, max_new_tokens=100)
"""


def adapt(snippet: str, package: str, paths: dict[str, Path]) -> str:
    """``peft`` -> ``package`` in the imports; hub id and placeholder paths -> local dirs."""
    code = re.sub(r"^from peft import", f"from {package} import", snippet, flags=re.M)
    for placeholder, path in paths.items():
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    return code


def run(code: str, **names) -> tuple[dict, str]:
    """Execute ``code`` with ``names`` predefined; returns its namespace and what it printed."""
    namespace = {"torch": torch, **names}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<seed snippet>", "exec"), namespace)
    return namespace, printed.getvalue()
