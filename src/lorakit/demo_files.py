"""The demo's output directory: claiming it before training (``claim_output``: never another
tool's or a user's files), and what the demo writes there after it (``predictions.jsonl``,
``summary.json``, ``summary.txt``: ``write_predictions``, ``write_summary``), with the check
that the merged model predicts what the adapter did (``check_merged_agrees``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.io.atomic import write_text

__all__ = [
    "DEMO_MARKER",
    "RESULT_FILES",
    "check_claimable",
    "check_merged_agrees",
    "claim_output",
    "file_sizes",
    "summary_lines",
    "write_predictions",
    "write_summary",
]


def write_summary(output: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` as ``<output>/summary.json`` and, readable, ``<output>/summary.txt``,
    and print the readable lines."""
    write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = summary_lines(summary)
    write_text(output / "summary.txt", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


DEMO_MARKER = "demo_run.txt"
"""Written first into a demo's output directory: a later demo may replace what is there."""

RESULT_FILES = ("summary.json", "summary.txt", "predictions.jsonl")
"""What a demo writes after its adapter, describing it: a rerun removes an earlier demo's before
it trains, so that an interrupted rerun never leaves them beside another adapter."""


def claim_output(output: Path) -> None:
    """Make ``output`` the demo's: absent, empty or a previous demo's (``DEMO_MARKER``, or the
    ``summary.json`` that demos wrote before the marker existed: ``_is_demo_summary``), since
    the demo replaces its adapter, checkpoints and metrics; any other directory (a ``lorakit
    train`` run, say) is refused before the model loads, so nothing of it is lost. A previous
    demo's ``RESULT_FILES`` are removed (after the marker is written, so that the directory
    stays claimed); training removes its adapter, checkpoints and metrics."""
    check_claimable(output)
    output.mkdir(parents=True, exist_ok=True)
    write_text(
        output / DEMO_MARKER,
        "written by `lorakit demo`; a later demo replaces this directory's results\n",
    )
    for name in RESULT_FILES:
        (output / name).unlink(missing_ok=True)


def check_claimable(output: Path) -> None:
    """``claim_output``'s refusal alone (``UserError``; nothing is written): ``output`` is a
    file, or a directory holding something that is not an earlier demo's."""
    from lorakit.errors import UserError

    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory for the demo's results")
    earlier_demo = (output / DEMO_MARKER).is_file() or _is_demo_summary(output / "summary.json")
    if output.is_dir() and not earlier_demo:
        held = sorted(path.name for path in output.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise UserError(
                f"--output {output} is not an earlier demo's output (it has no {DEMO_MARKER}) "
                f"and holds {shown}; the demo replaces its adapter, checkpoints and metrics "
                "there: give another --output or empty that directory"
            )


def _is_demo_summary(path: Path) -> bool:
    """Whether ``path`` is the ``summary.json`` of a demo from before ``DEMO_MARKER`` existed: a
    JSON object with the demo's accuracy fields (any other summary.json, of a user or another
    tool, leaves its directory refused)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    demo_fields = ("zero_shot_accuracy", "fine_tuned_accuracy", "held_out_reviews", "adapter_dir")
    return isinstance(summary, dict) and all(field in summary for field in demo_fields)


def write_predictions(path: Path, held_out, zero_shot, fine_tuned, merged) -> None:
    """One JSON line per held-out review: where it comes from, its label and each model's
    predicted choice index (0 = positive, 1 = negative)."""
    lines = []
    for example, *predicted in zip(held_out, zero_shot, fine_tuned, merged, strict=True):
        row = {"review": example.source, "label": example.label}
        row.update(zip(("zero_shot", "fine_tuned", "merged"), predicted, strict=True))
        lines.append(json.dumps(row))
    write_text(path, "\n".join(lines) + "\n")


def check_merged_agrees(summary: dict[str, Any], output: Path) -> None:
    """The merged model must predict what the model with the adapter predicted (a review whose
    two answers were tied to within the merge's rounding may flip; it is counted, not failed)."""
    from lorakit.errors import UserError

    disagree = summary["held_out_reviews"] - summary["merged_predictions_agree"]
    disagree -= summary["merged_disagreements_at_near_ties"]
    if disagree:
        raise UserError(
            f"merge check failed: the merged model's prediction differs from the adapter's on "
            f"{disagree} of {summary['held_out_reviews']} held-out reviews (max |log-prob "
            f"difference| {summary['merged_max_abs_logprob_difference']:.2e}); see "
            f"{output / 'predictions.jsonl'} and summary.json"
        )


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The readable summary."""
    from lorakit.units import format_bytes

    return [
        f"Rotten Tomatoes sentiment, {summary['held_out_reviews']} held-out test reviews "
        f"(never seen in training), {summary['model']}:",
        f"  zero-shot accuracy     {summary['zero_shot_accuracy']:.1%}",
        f"  after {'DoRA' if summary.get('use_dora') else 'LoRA'} ({summary['steps']} steps, {summary['training_reviews']} reviews) "
        f"{summary['fine_tuned_accuracy']:.1%}  ({summary['accuracy_gain_points']:+.1f} points)",
        f"  adapter: {summary['trainable_parameters']:,} parameters, "
        f"{format_bytes(summary['adapter_bytes'])} vs base model "
        f"{format_bytes(summary['base_model_bytes'])} "
        f"({summary['adapter_percent_of_base']:.2f}%)",
        f"  merged model: {summary['merged_predictions_agree']}/{summary['held_out_reviews']} "
        f"predictions identical (max |log-prob difference| "
        f"{summary['merged_max_abs_logprob_difference']:.1e}"
        + (
            f"; {ties} flipped at near-ties"
            if (ties := summary["merged_disagreements_at_near_ties"])
            else ""
        )
        + ")",
        f"  files: {summary['adapter_dir']}, {summary['loss_curve']}, summary.json "
        f"({summary['seconds']:.0f} s)",
    ]


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def file_sizes(model_spec: str, adapter_dir: Path, base_parameters: int) -> dict[str, Any]:
    """The adapter's bytes on disk against the base model's (its safetensors files, else 4 bytes
    a parameter), for the summary."""
    from lorakit.models import resolve_model

    adapter_bytes = _directory_bytes(adapter_dir)
    base_bytes = _directory_bytes(resolve_model(model_spec)) or 4 * base_parameters
    return {
        "adapter_bytes": adapter_bytes,
        "base_model_bytes": base_bytes,
        "adapter_percent_of_base": 100.0 * adapter_bytes / base_bytes,
    }
