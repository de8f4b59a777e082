"""What ``LoraConfig.init_lora_weights`` may say, and the settings of the inits that take some:
PEFT's values and how it reads them (``canonical_init``: the case rules), which of them rewrite
the base weight (PiSSA, OLoRA, LoftQ: ``changes_base``; CorDA, Astra and LoRA-GA, PEFT-only:
``changes_base_in_peft_only``), the messages for PEFT's values lorakit does not implement (MiCA,
CorDA, Astra, LoRA-GA: ``not_implemented_message``), and the settings of EVA (``EvaConfig``, ``lorakit.eva``) and LoftQ
(``LoftQConfig``). The factors themselves are computed in ``lorakit.init_factors``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "BASE_CHANGING_INITS",
    "EvaConfig",
    "LoftQConfig",
    "canonical_init",
    "changes_base",
    "changes_base_in_peft_only",
    "not_implemented_message",
    "randomised_pissa",
]

BASE_CHANGING_INITS = ("pissa", "pissa_niter_K", "olora", "loftq")
# PEFT's inits that also rewrite the base (W_res = W0 - s B0 A0) but from data lorakit does not
# have, so it cannot redo them: CorDA (activation covariances; PEFT takes any "corda..." value),
# Astra (peft 0.22: output-activation eigenvectors; any "astra..." value, as CorDA) and LoRA-GA
# (gradients; "lora_ga" exactly). Their unconverted files are refused on loading.
PEFT_ONLY_BASE_CHANGING_INITS = ("corda", "astra", "lora_ga")
# Of these, the ones PEFT matches by their prefix (``init.startswith(...)`` in its LoRA layer).
_PREFIX_MATCHED_PEFT_ONLY = ("corda", "astra")
# The init_lora_weights strings PEFT compares case-insensitively (``init.lower() == ...`` in
# its LoRA layer); every other one ("pissa...", "loftq", "eva", "orthogonal", ...) exactly.
CASE_INSENSITIVE_INITS = ("gaussian", "mica", "olora")
PISSA_VALUE = re.compile(r"pissa(?:_niter_(\d+))?")  # "pissa", "pissa_niter_K" (group 1: K)
_CONVERT_FIRST = (
    "initialise, train and save it with peft, converting it on saving "
    "(save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved right "
    "after the init>)), then load the converted file, a plain LoRA for the original base, "
    "with lorakit"
)
# PEFT's init_lora_weights values lorakit does not implement: (what it is, the way out).
_PEFT_ONLY = {
    "mica": (
        "MiCA (B from the r left singular vectors of W0 with the smallest singular values, "
        "A = 0, B frozen while training)",
        "initialise it with peft and load the saved file with lorakit (it reads as a plain "
        "LoRA: the same forward; keep lora_B frozen to train it as MiCA does), or use "
        "init_lora_weights=True",
    ),
    "nora": (
        "NoRA (peft 0.22: the default A with each column scaled to unit L2 norm, B = 0)",
        "initialise it with peft and load the saved file with lorakit (it reads as a plain "
        "LoRA: the same forward), or use init_lora_weights=True",
    ),
    "corda": (
        "CorDA (A and B from the SVD of W0 times activation statistics of data; the base "
        "becomes W0 - s B A)",
        _CONVERT_FIRST,
    ),
    "astra": (
        "Astra (peft 0.22: A and B from the base weight projected onto the tail eigenvectors "
        "of output-activation covariances of calibration data; the base becomes W0 - s B A)",
        _CONVERT_FIRST,
    ),
    "lora_ga": (
        "LoRA-GA (A and B from the SVD of gradients on data; the base becomes W0 - s B A)",
        _CONVERT_FIRST,
    ),
}


@dataclass
class EvaConfig:
    """Settings of EVA, ``init_lora_weights="eva"`` (PEFT's ``EvaConfig``, same fields and
    defaults; the procedure is ``lorakit.eva.initialize_lora_eva_weights``)."""

    rho: float = 2.0
    """A layer's rank may grow to ``round(r * rho)`` (>= 1; 1 keeps every rank). Above 1000,
    EVA caps it at ``max_dim // r``, as PEFT does (``lorakit.eva``)."""
    tau: float = 0.99
    """Stop reading batches once every needed component's cosine similarity with its value one
    batch earlier is >= tau (in [0, 1])."""
    use_label_mask: bool = True
    """Leave out token positions whose ``labels`` equal ``label_mask_value``."""
    label_mask_value: int = -100
    """The label of positions left out."""
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """``alpha *= new_rank / r`` for a layer whose rank changed (same gradient scale)."""

    def __post_init__(self) -> None:
        _check_setting(self, "rho", _is_number(self.rho) and self.rho >= 1, "a number >= 1")
        _check_setting(
            self, "tau", _is_number(self.tau) and 0.0 <= self.tau <= 1.0, "a number in [0, 1]"
        )
        for flag in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            _check_setting(self, flag, isinstance(getattr(self, flag), bool), "True or False")
        _check_setting(
            self, "label_mask_value", _is_int(self.label_mask_value), "an integer (a label id)"
        )


@dataclass
class LoftQConfig:
    """Settings of LoftQ, ``init_lora_weights="loftq"`` (PEFT's ``LoftQConfig``)."""

    loftq_bits: int = 4
    """4 (NF4) or 8 (int8 row-wise), bitsandbytes' formats."""
    loftq_iter: int = 1
    """Alternating quantize / SVD steps (>= 1)."""

    def __post_init__(self) -> None:
        _check_setting(
            self, "loftq_bits", _is_int(self.loftq_bits) and self.loftq_bits in (4, 8), "4 or 8"
        )
        _check_setting(
            self,
            "loftq_iter",
            _is_int(self.loftq_iter) and self.loftq_iter >= 1,
            "an integer >= 1",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float, not a bool, and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_setting(settings: object, field_name: str, ok: bool, expected: str) -> None:
    """``ValueError`` naming the field of ``settings`` (an ``EvaConfig`` / ``LoftQConfig``),
    its value and what it should be, unless ``ok``."""
    if not ok:
        value = getattr(settings, field_name)
        raise ValueError(
            f"{type(settings).__name__}.{field_name}={value!r} is invalid: expected {expected}"
            f" (of type {type(value).__name__})."
        )


def canonical_init(init: object) -> object:
    """``init`` (an ``init_lora_weights`` value) in lower case when PEFT reads it so
    (``CASE_INSENSITIVE_INITS``: "OLoRA" is "olora", "Gaussian" is "gaussian"); any other
    value as it is ("PiSSA" stays, and is refused, as PEFT refuses it)."""
    if isinstance(init, str) and init.lower() in CASE_INSENSITIVE_INITS:
        return init.lower()
    return init


def not_implemented_message(init: object) -> str | None:
    """The ``ValueError`` message for a PEFT ``init_lora_weights`` value lorakit does not
    implement ("mica" in any case, "corda..." and "astra..." as PEFT matches their prefix,
    "lora_ga"), saying
    what it is and what to do instead; None for any other value
    (a typo gets the config's "is invalid: expected ..." message). "MiCA" is quoted as PEFT
    reads it, "mica" (``canonical_init``)."""
    if not isinstance(init, str):
        return None
    key = _peft_only_key(init)
    if key not in _PEFT_ONLY:
        return None
    what, way_out = _PEFT_ONLY[key]
    return (
        f"LoraConfig.init_lora_weights={init!r} is invalid: it is PEFT's {what}, "
        f"not implemented in lorakit: {way_out}."
    )


def changes_base(init: object) -> bool:
    """True when ``init`` (``LoraConfig.init_lora_weights``) rewrites the base weight."""
    return isinstance(init, str) and (
        init in ("olora", "loftq") or PISSA_VALUE.fullmatch(init) is not None
    )


def changes_base_in_peft_only(init: object) -> bool:
    """True when ``init`` (a file's ``init_lora_weights``) is one of
    ``PEFT_ONLY_BASE_CHANGING_INITS``, matched as PEFT matches it: ``"corda..."`` and
    ``"astra..."`` by their prefix, ``"lora_ga"`` exactly. Such a file's A and B fit ``W_res``,
    not the original base."""
    return isinstance(init, str) and _peft_only_key(init) in PEFT_ONLY_BASE_CHANGING_INITS


def _peft_only_key(init: str) -> str:
    """``init`` as PEFT matches it among its own inits: "corda..." is "corda", "astra..." is
    "astra" (``_PREFIX_MATCHED_PEFT_ONLY``); any other value as it is."""
    return next((key for key in _PREFIX_MATCHED_PEFT_ONLY if init.startswith(key)), init)


def randomised_pissa(init: object) -> bool:
    """``init`` is ``"pissa_niter_K"``: PiSSA by a randomised SVD (``torch.svd_lowrank``)."""
    return isinstance(init, str) and init != "pissa" and PISSA_VALUE.fullmatch(init) is not None
