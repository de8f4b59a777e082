"""Adapter files whose A and B belong to a PiSSA / OLoRA residual base, not to the original one.

A PiSSA / OLoRA init moves the base's principal part into the adapter (``W0 - s B0 A0`` stays
in the base); a file saved without conversion holds factors that only fit that residual base
(``lorakit.init_methods``). ``residual_base_init`` says whether a file is one, from its config
or, for lorakit's own saves, its header metadata (``BASE_INIT_METADATA_KEY``);
``refuse_residual_base_factors`` refuses it for a reader that would take its A and B as a plain
LoRA of the original base (serving, GGUF export, combining, analysis). Both read a header only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.errors import AdapterFileError
from lorakit.init_methods import changes_base
from lorakit.io.adapter_dirs import WEIGHTS_NAME
from lorakit.io.config_json import CONFIG_NAME

if TYPE_CHECKING:
    from lorakit.io.read import AdapterFile, AdapterHeader

__all__ = ["BASE_INIT_METADATA_KEY", "refuse_residual_base_factors", "residual_base_init"]

# The base-changing init of an adapter lorakit saved unconverted (its adapter_config.json then
# says true, so that peft does not rerun the init; ``save.adapter_file_contents``).
BASE_INIT_METADATA_KEY = "lorakit.base_changing_init"


def residual_base_init(
    adapter: AdapterHeader | AdapterFile, *, fingerprint_checked: bool = False
) -> tuple[str, str] | None:
    """``(init, where the file says so)`` when ``adapter``'s A and B only fit the residual base
    ``W0 - s B0 A0`` of a PiSSA / OLoRA init (``lorakit.init_methods``), else None:

    - a file PEFT saved without conversion: ``init_lora_weights`` "pissa", "pissa_niter_K" or
      "olora" in its config (PEFT, and ``load_adapter``, rerun the init on the base to load it);
    - an adapter lorakit saved without conversion: config ``true``, the init in the header
      metadata ``BASE_INIT_METADATA_KEY``, and the residual base's fingerprint. With
      ``fingerprint_checked`` (the reader checks that fingerprint against its base model, which
      refuses the original base and accepts the residual model) it is not reported.

    LoftQ is never reported: its base is the quantized ``Q``, a model saved and used as it is,
    and the factors are a plain LoRA of that base (``load_adapter`` loads LoftQ files as is).
    """
    init = adapter.config.init_lora_weights
    if changes_base(init) and init != "loftq":
        return str(init), f"PEFT saved it without conversion (init_lora_weights in {CONFIG_NAME})"
    recorded = adapter.metadata.get(BASE_INIT_METADATA_KEY)
    if not fingerprint_checked and changes_base(recorded) and recorded != "loftq":
        return str(recorded), (
            f"lorakit saved it without conversion (init_lora_weights in the {WEIGHTS_NAME} "
            f"metadata {BASE_INIT_METADATA_KEY!r}; its {CONFIG_NAME} says true)"
        )
    return None


def refuse_residual_base_factors(
    adapter: AdapterHeader | AdapterFile, doing: str, *, fingerprint_checked: bool = False
) -> None:
    """``AdapterFileError`` naming the file when ``residual_base_init`` finds that its factors
    belong to a PiSSA / OLoRA residual base, for a reader that would use them as a plain LoRA
    of the original base; ``doing`` says what it would do ("exporting it to GGUF"). Call it
    before any other work (a header is enough)."""
    found = residual_base_init(adapter, fingerprint_checked=fingerprint_checked)
    if found is None:
        return
    init, where = found
    raise AdapterFileError(
        f"adapter {adapter.directory}: {where}. init_lora_weights={init!r} means its lora_A / "
        "lora_B belong to the PiSSA/OLoRA residual base W0 - s B0 A0 that this init made, not "
        f"to the original base weights, so {doing} would give wrong results. Convert it to a "
        "plain LoRA for the original base first: with PEFT, model.save_pretrained(out, "
        "path_initial_model_for_weight_conversion=<initial adapter dir>); with lorakit, "
        "lorakit.save_adapter(model, out, initial_adapter=<initial adapter dir>) (the initial "
        "adapter: saved right after the init, before training)."
    )
