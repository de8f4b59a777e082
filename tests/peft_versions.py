"""What the installed peft (the tests' oracle) does differently by version.

The tests compare lorakit against whichever peft the set-up installed (``peft>=0.13``); where a
peft release fixed one of its own defects that a test measures, the test asks here which
behaviour to expect, so that it checks the oracle's real numbers on either side of the fix.
"""

from __future__ import annotations

import peft
from packaging.version import Version

__all__ = ["peft_at_least", "peft_scales_rslora_combinations"]


def peft_at_least(version: str) -> bool:
    """Whether the installed peft is ``version`` or later."""
    return Version(peft.__version__) >= Version(version)


def peft_scales_rslora_combinations() -> bool:
    """Before 0.22, ``add_weighted_adapter`` copied the first adapter's ``use_rslora`` into the
    new adapter while setting ``lora_alpha = r``: every result was √r too large (r: the new
    rank). peft 0.22 writes ``use_rslora=False``."""
    return not peft_at_least("0.22")
