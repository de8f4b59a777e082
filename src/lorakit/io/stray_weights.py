"""Frozen base weights an adapter file carries for modules it does not adapt: PEFT's
``save_pretrained(selected_adapters=[...])`` of a model whose OTHER adapter wraps a module
writes that module's ``<path>.base_layer.weight`` too (``save_embedding_layers="auto"``).
Loading and combining treat them as PEFT's load does (``io.load_plan``, ``combining.sources``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from lorakit.errors import listed
from lorakit.io.keys import module_path, parse_lora_key

__all__ = ["StrayBaseWeightWarning", "stray_base_layer_module", "stray_base_weight_message"]


def stray_base_layer_module(file_key: str, adapted: Collection[str]) -> str | None:
    """``<path>`` for a ``<path>.base_layer.weight`` key when ``<path>`` is not among
    ``adapted`` (the modules with LoRA factors in the same file), else None.

    PEFT's ``save_pretrained(selected_adapters=["b"])`` of a model whose OTHER adapter "a"
    wraps ``lm_head`` writes ``lm_head.base_layer.weight`` into b's file
    (``save_embedding_layers="auto"`` saves the embedding layers' weights, by their names in
    the wrapped model): a frozen base weight of a module b does not adapt. PEFT's load (a
    non-strict ``load_state_dict``) ignores it where ``<path>`` is a plain module (the key fits
    no parameter: measured with peft 0.21.2) and writes it into the base weight where another
    adapter already wraps ``<path>`` (the key is then that wrapper's base's)."""
    suffix = ".base_layer.weight"
    if not file_key.endswith(suffix) or parse_lora_key(file_key) is not None:
        return None
    path = module_path(file_key.removesuffix(suffix))
    if path.endswith(".token_adapter") or path in adapted:
        return None  # (an embedding's with trainable tokens; an adapted one's: base_weight)
    return path


class StrayBaseWeightWarning(UserWarning):
    """An adapter file's ``<path>.base_layer.weight`` of a module it does not adapt
    (``stray_base_layer_module``) was left out, as PEFT's load leaves it out."""


def stray_base_weight_message(source: str, keys: Sequence[str], what: str) -> str:
    """The warning (``StrayBaseWeightWarning``) for ``keys`` (stray base weights of
    ``source``, e.g. "adapter DIR"): what they are, ``what`` is done with them, the way out."""
    return (
        f"{source} holds {listed(keys, 4)}: a frozen base weight of a module it does not "
        "adapt, which PEFT's save_pretrained wrote because another adapter of the same model "
        f"adapted that module (save_embedding_layers='auto'); {what}. Re-save the adapter "
        "with save_embedding_layers=False to leave it out of the file."
    )
