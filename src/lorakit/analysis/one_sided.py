"""Parameters that only one of two compared models has (a fine-tune with a block more or less
than its base, a head only one of them carries).

Such a parameter has no ``W_ft - W0``, and a LoRA on the base can neither add nor remove it,
so ``lorakit analyze`` lists it in ``left_out`` and ``lorakit extract`` in
``uncaptured_changes`` (``OneSidedParameter``), by parameter name (tied names included: each
name a model answers to counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["OneSidedParameter", "format_one_sided", "one_sided_parameters", "one_sided_summary"]

HEADER = (
    "left out (in one model only: no W_ft - W0, and a LoRA on the base cannot add or remove it):"
)


@dataclass(frozen=True)
class OneSidedParameter:
    """Parameter ``name`` of shape ``shape``, present in ``model`` ("base" or "fine-tuned")
    only."""

    name: str
    model: str
    shape: tuple[int, ...]

    @property
    def reason(self) -> str:
        other = "fine-tuned model" if self.model == "base" else "base"
        return f"only in the {self.model} model (the {other} has no such parameter)"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "only_in": self.model,
            "shape": list(self.shape),
            "reason": self.reason,
        }

    def uncaptured_entry(self) -> dict:
        """The ``uncaptured_changes`` entry an extraction gives it."""
        return {
            "change": None,
            "relative": None,
            "only_in": self.model,
            "shapes": list(self.shape),
            "note": f"{self.reason}: not extracted (a LoRA on the base cannot carry it)",
        }


def one_sided_parameters(base: nn.Module, finetuned: nn.Module) -> list[OneSidedParameter]:
    """Every parameter name of one model the other lacks: the base's first, then the
    fine-tune's, each in its model's order."""
    base_parameters = dict(base.named_parameters(remove_duplicate=False))
    tuned_parameters = dict(finetuned.named_parameters(remove_duplicate=False))
    return [
        OneSidedParameter(name, which, tuple(parameter.shape))
        for which, mine, theirs in (
            ("base", base_parameters, tuned_parameters),
            ("fine-tuned", tuned_parameters, base_parameters),
        )
        for name, parameter in mine.items()
        if name not in theirs
    ]


def format_one_sided(parameters: Sequence[OneSidedParameter], shown: int = 8) -> list[str]:
    """The lines of a printed report: ``HEADER``, then the first ``shown`` parameters, one a
    line, then how many more (the JSON lists all); none when ``parameters`` is empty."""
    if not parameters:
        return []
    lines = [HEADER, *(f"  {p.name}: {p.reason}" for p in parameters[:shown])]
    if len(parameters) > shown:
        lines.append(f"  ... and {len(parameters) - shown} more (--json lists them all)")
    return lines


def one_sided_summary(parameters: Sequence[OneSidedParameter]) -> str:
    """``"; N parameter(s) only in the <model> model (first, ...)"`` per model, for a refusal
    ("" when none)."""
    parts = []
    for which in ("base", "fine-tuned"):
        names = [p.name for p in parameters if p.model == which]
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(
                f"; {len(names)} parameter(s) only in the {which} model "
                f"({', '.join(names[:3])}{more}): a LoRA on the base cannot carry them"
            )
    return "".join(parts)
