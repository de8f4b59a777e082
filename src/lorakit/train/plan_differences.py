"""The differences between a run's data plan and its checkpoint's, in words naming the flags.

``lorakit.train.resume.check_resumable`` refuses a resumed run whose data plan (example count,
token lengths and digest, global batch, steps, short batch, base dtype) is not the checkpoint's;
``plan_differences`` says each difference once, with this run's value, the checkpoint's and
the flags behind it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plan_differences", "shown"]

_SHORT_BATCH_HINT = (
    " (the checkpoint's run kept the epoch's short batch, which this run's processes cannot "
    "split so that each gets a share of every micro-batch: resume in one process, or with a "
    "--batch-size, --grad-accum and process count whose product is the checkpoint's global "
    "batch and that split it)"
)


_PLAN_WORDS = {
    "base_dtype": "--dtype {now} (the checkpoint's: {saved})",
    "num_examples": "{now} training examples (the checkpoint's: {saved}; --data / --split)",
    "global_batch": "a global batch (--batch-size x --grad-accum x processes) of {now} "
    "(the checkpoint's: {saved})",
    "total_steps": "{now} optimizer steps (the checkpoint's: {saved}; --steps / --epochs)",
    "lengths_sha256": "the examples' token lengths differ from the checkpoint's: the training "
    "data (--data / --split) or --max-length is not the one the checkpoint was trained on",
    "examples_sha256": "the training examples differ from the checkpoint's (sha256 of their "
    "tokens and labels {now}, the checkpoint's {saved}): the training data (--data / --split) "
    "or --max-length is not the one the checkpoint was trained on",
}
"""Each data-plan difference in words, by its key in ``data_plan``, naming the flags behind it
(``{now}``: this run's value, ``{saved}``: the checkpoint's)."""


def plan_differences(
    plan: dict[str, Any], saved_plan: dict[str, Any], saved_training: dict[str, Any]
) -> list[str]:
    """The differences of the data plan, in words; keys also in ``saved_training`` (the seed)
    are named with the trajectory. Other data (``examples_sha256``, compared where both runs
    know it) is said once, not also as other lengths and another count; another count ``n`` or
    global batch ``G`` not also as another short batch (``n mod G`` examples, which follows)."""
    differing = [
        key
        for key in saved_plan
        if saved_plan[key] != plan.get(key)
        and key not in saved_training
        and key != "steps_rule"  # (how total_steps was counted; total_steps is compared)
        and not (key == "examples_sha256" and None in (saved_plan[key], plan.get(key)))
    ]
    if "examples_sha256" in differing:
        differing = [key for key in differing if key not in ("lengths_sha256", "num_examples")]
    counts = ("num_examples", "global_batch")
    if any(key in saved_plan and saved_plan[key] != plan.get(key) for key in counts):
        differing = [key for key in differing if key != "short_batch"]  # (n mod G: follows)
    return [_plan_difference(key, plan, saved_plan) for key in differing]


def _plan_difference(key: str, plan: dict[str, Any], saved_plan: dict[str, Any]) -> str:
    """One difference of the data plan, in words (``_PLAN_WORDS``); for a short batch the
    checkpoint kept and this run's processes must drop (the global batch being the same), what
    to do instead."""
    now, saved = plan.get(key), saved_plan[key]
    if key in _PLAN_WORDS:
        return _PLAN_WORDS[key].format(now=shown(now, str), saved=shown(saved, str))
    text = f"{key.replace('_', ' ')} {shown(now)} (the checkpoint's: {shown(saved)})"
    if key == "short_batch" and plan.get("global_batch") == saved_plan.get("global_batch"):
        text += _SHORT_BATCH_HINT
    return text


def shown(value: Any, form=repr) -> str:
    """A setting's value in a message: ``form(value)``, or "none" where the run has none (no
    short batch, say), never Python's None."""
    return "none" if value is None else form(value)
