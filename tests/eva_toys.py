"""EVA's toy set-up, shared by its tests: a small MLP and inputs of a sharply falling spectrum."""

from __future__ import annotations

import torch
from torch import nn


def toy_batches(scales=(30.0, 1.0, 0.5, 0.25), count: int = 8) -> list[torch.Tensor]:
    """Inputs (64, 24) of a sharply falling spectrum: PEFT's randomised incremental PCA then
    finds the same leading directions as an exact one."""
    generator = torch.Generator().manual_seed(1)
    mix = torch.randn(len(scales), 24, generator=generator)
    return [
        (torch.randn(64, len(scales), generator=generator) * torch.tensor(scales)) @ mix
        + 0.01 * torch.randn(64, 24, generator=generator)
        for _ in range(count)
    ]


def toy_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 6)
    )
