"""The base-model check of ``load_adapter`` (``lorakit.io.load``): the base weights an adapter's
LoRA layers sit on are the ones it was saved with (``lorakit.io.fingerprint``), unless
``allow_base_mismatch``; what to do when they are not (``_load_remedy``: for an unconverted
PiSSA / OLoRA / LoftQ adapter, which base it needs); and the warnings for a base that cannot be
verified.
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.errors import listed
from lorakit.init_methods import changes_base
from lorakit.io import base_verdicts
from lorakit.io.read import BASE_INIT_METADATA_KEY, AdapterFile

__all__ = ["check_base"]


_LOAD_REMEDY = (
    "Load it onto the base model it was trained on, or pass allow_base_mismatch=True to load "
    "it anyway."
)


def _load_remedy(adapter: AdapterFile) -> str:
    """What to do about a base mismatch: ``_LOAD_REMEDY``, or, for an adapter lorakit saved
    without conversion after a base-changing init (``BASE_INIT_METADATA_KEY``), which base it
    needs (the model that init left) and how to get there: ``allow_base_mismatch`` would put
    its factors on a base they do not belong to, so it is not offered."""
    init = adapter.metadata.get(BASE_INIT_METADATA_KEY)
    if not changes_base(init):
        return _LOAD_REMEDY
    needed = (
        "the base Q that this init left (W0's LoftQ quantization, dequantized)"
        if init == "loftq"
        else "the residual base W0 - s B0 A0 that this init left"
    )
    convert = (
        ""
        if init == "loftq"
        else ", or convert it to a plain LoRA for the original base: with lorakit, "
        "lorakit.save_adapter(model, out, initial_adapter=<initial adapter dir>); with PEFT, "
        "model.save_pretrained(out, path_initial_model_for_weight_conversion=<initial adapter "
        "dir>) (the initial adapter: saved right after the init, before training)"
    )
    return (
        f"It was saved without conversion after init_lora_weights={init!r} (header metadata "
        f"{BASE_INIT_METADATA_KEY!r}): its lora_A / lora_B belong to {needed}, not to the "
        "original base weights, so allow_base_mismatch=True would give wrong outputs. Load it "
        "onto that model (lorakit.unload(model) on the model the init ran on gives it back; "
        f"save that model){convert}."
    )


def check_base(
    model: nn.Module,
    adapter: AdapterFile,
    adapted: list[str],
    replaced: set[str],
    allow_base_mismatch: bool,
    modules: dict[str, nn.Module],
) -> None:
    """The base weights under the ``adapted`` modules (those with LoRA factors) are the ones
    ``adapter`` was saved on (``lorakit.io.fingerprint``), but for ``replaced``, whose base
    weight the file brings; a mismatch raises ``BaseModelMismatchError`` naming the base the
    adapter config records (``base_model_name_or_path``) and the model's, where known, with the
    way out (``_load_remedy``), or warns with ``allow_base_mismatch``. A base that cannot be
    verified (no fingerprint, modules it does not cover, base weights on the meta device with
    nothing to read them from, or nothing left to check) is loaded with a warning."""
    checked = [name for name in adapted if name not in replaced]
    _warn_nothing_checked(adapter, adapted, replaced)
    note = base_verdicts.unverified_note(
        model, adapter.fingerprint, adapter.directory, checked, modules
    )
    if note is not None:
        warnings.warn(note, stacklevel=4)  # the caller of load_adapter
    message = base_verdicts.refuse_other_base(
        model,
        adapter.fingerprint,
        adapter.directory,
        checked,
        allow_mismatch=allow_base_mismatch,
        remedy=_load_remedy(adapter),
        modules=modules,
        trained_on=adapter.config.base_model_name_or_path,
    )
    if message is not None:
        overridden = message.removesuffix(".")
        warnings.warn(
            f"{overridden}; loaded anyway: allow_base_mismatch=True overrode the check",
            stacklevel=4,  # the caller of load_adapter
        )


def _warn_nothing_checked(adapter: AdapterFile, adapted: list[str], replaced: set[str]) -> None:
    """Warn, as for a file whose base cannot be verified (``base_verdicts.unverified_note``), when
    a file with a base-model fingerprint brings the base weight of EVERY module it adapts (the
    resized embeddings only, saved with ``save_embedding_layers``): the fingerprint check leaves
    out each module whose base the file replaces, so nothing of this model's base is checked and
    the adapter would load silently onto any base of the same shapes. A file without a
    fingerprint gets ``unverified_note``'s own warning; a file adapting one module it does not
    replace (e.g. ``q_proj``) is checked on that one. ``adapted``: the modules with LoRA factors;
    ``replaced``: those whose base weight the file brings."""
    if adapter.fingerprint is None or not adapted or not replaced.issuperset(adapted):
        return
    warnings.warn(
        f"adapter {adapter.directory} brings the base weights of every module it adapts "
        f"({listed(set(adapted), 3)}: saved with save_embedding_layers), so the base-model "
        "fingerprint check leaves them out and nothing else of this base was checked: lorakit "
        "cannot verify the adapter was trained on this base model. Load it only onto the base "
        "it was trained on; an adapter that also adapts a module whose base weight the file "
        "does not bring (e.g. q_proj) is checked on that module.",
        stacklevel=5,  # the caller of load_adapter (<- check_base <- _load_checked <- load_adapter)
    )
