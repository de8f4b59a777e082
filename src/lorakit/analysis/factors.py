"""The factors ``(A, B, s)`` of an adapter, from a model or from a file, checked for a spectrum.

``adapter_factors`` reads them from the LoRA layers of a model, ``tensor_factors`` from an
adapter file's tensors and config; both refuse what has no low-rank update ``s B A`` (per-expert
factors, DoRA), and a file's factors are checked (both present, two finite floating-point
matrices sharing a rank; a convolution's LoRA is refused as not supported) before
``lorakit.analysis.spectrum`` takes their singular values. An embedding's factors come
transposed, so that ``s B A`` is its update as PEFT's ``get_delta_weight`` gives it,
(num_embeddings, dim).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorakit import functional
from lorakit.errors import UserError
from lorakit.io.keys import lora_key_pairs

__all__ = ["adapter_factors", "tensor_factors"]


def adapter_factors(
    model: nn.Module, adapter_name: str = "default"
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """``(module name, A (r, k), B (d, r), s)`` for every LoRA layer holding ``adapter_name``.

    Embedding adapters are included: their stored A (r, num), B (dim, r) give the update
    ``s (B A)^T = s A^T B^T`` (num, dim), so they come as ``(B^T (r, dim), A^T (num, r))``.
    """
    from lorakit.layers import LoraParameter
    from lorakit.layers.embedding import LoraEmbedding
    from lorakit.state import lora_layers

    for name, layer in lora_layers(model):
        if adapter_name not in layer.ranks:
            continue
        if isinstance(layer, LoraParameter):
            raise _per_expert_error(name)
        if layer.is_dora(adapter_name):
            raise _dora_error(adapter_name)
        lora_A, lora_B = layer.adapter_parameters(adapter_name)[:2]
        if isinstance(layer, LoraEmbedding):
            lora_A, lora_B = lora_B.T, lora_A.T  # (the update (num, dim) = s A^T B^T)
        yield name, lora_A, lora_B, layer.scalings[adapter_name]


def tensor_factors(
    tensors: Mapping[str, torch.Tensor], config
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """``(module name, A, B, s)`` from a PEFT adapter file's tensors and its ``LoraConfig``.

    Keys ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` (and the embedding
    ``lora_embedding_A`` / ``_B``); s comes from ``config.rank_for`` / ``alpha_for`` and
    ``functional.scaling`` (rsLoRA respected). An embedding's A (r, num), B (dim, r) come as
    ``(B^T, A^T)``, so that ``s B A`` is its (num, dim) update ``s A^T B^T``, as in PEFT.
    """
    if config.target_parameters:
        raise _per_expert_error(str(config.target_parameters))
    if config.use_dora:
        raise _dora_error("in the file")
    pairs = lora_key_pairs(tensors)  # {module: {"lora_A": key, "lora_B": key}}
    for name, keys in sorted(
        pairs.items(), key=lambda item: _natural_key(item[1].get("lora_A", ""))
    ):  # layers 2 before 10
        _check_both_factors(keys)
        lora_A, lora_B = tensors[keys["lora_A"]], tensors[keys["lora_B"]]
        _check_pair(keys["lora_A"], lora_A, lora_B, keys["lora_B"])
        rank = lora_A.shape[0]
        scale = functional.scaling(rank, config.alpha_for(name), config.use_rslora)
        if "lora_embedding_A" in keys["lora_A"]:  # (the update (num, dim) = s A^T B^T)
            lora_A, lora_B = lora_B.T, lora_A.T
        yield name, lora_A, lora_B, scale


def _check_both_factors(keys: Mapping[str, str]) -> None:
    """``AdapterFileError`` naming the key present and the one missing where a module of the
    file has one of its two factors only (``load_adapter`` refuses such a file too; a spectrum
    of the other modules alone would describe another adapter)."""
    from lorakit.errors import AdapterFileError

    if "lora_A" in keys and "lora_B" in keys:
        return
    present, missing = ("lora_A", "lora_B") if "lora_A" in keys else ("lora_B", "lora_A")
    key = keys[present]  # ...lora_A.weight, or an embedding's ...lora_embedding_A
    missing_key = re.sub(r"[AB](\.weight)?$", lambda found: missing[-1] + (found[1] or ""), key)
    raise AdapterFileError(
        f"{key} has no {missing} beside it ({missing_key} is missing): the adapter file is "
        "incomplete; save the adapter again"
    )


def _check_pair(
    key_A: str, lora_A: torch.Tensor, lora_B: torch.Tensor, key_B: str | None = None
) -> None:
    """``AdapterFileError`` naming the factor unless A (r, k) and B (d, r) are non-empty
    floating-point matrices sharing r, with finite values only (what a damaged or hand-made
    file, or a diverged training run, may not hold); ``UserError`` for the factors of a
    convolution (both 3-D or more: not supported)."""
    from lorakit.errors import AdapterFileError

    shapes = f"A {list(lora_A.shape)} {lora_A.dtype}, B {list(lora_B.shape)} {lora_B.dtype}"
    if lora_A.dim() == lora_B.dim() >= 3:  # PEFT's LoRA on nn.Conv1d / Conv2d / Conv3d
        raise UserError(
            f"{key_A}: a LoRA on a convolution layer ({shapes}; e.g. nn.Conv2d: A (r, C, kh, "
            "kw), B (d, r, 1, 1)): its update is a kernel, not a (d, k) matrix, and analyze "
            "supports LoRA on linear / Conv1D / embedding layers only (as combine does)"
        )
    matrices = lora_A.dim() == 2 == lora_B.dim() and lora_A.numel() and lora_B.numel()
    if not (matrices and lora_A.shape[0] == lora_B.shape[1]):
        raise AdapterFileError(
            f"{key_A}: its factors are not two matrices sharing a rank ({shapes})"
        )
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise AdapterFileError(f"{key_A}: its factors are not floating point ({shapes})")
    for key, factor in ((key_A, lora_A), (key_B or f"the lora_B beside {key_A}", lora_B)):
        bad = int((~torch.isfinite(factor)).sum())
        if bad:
            raise AdapterFileError(
                f"{key} holds {bad} NaN or inf value(s) of {factor.numel()}: the update has no "
                "spectrum (did the training diverge?); re-train or re-save the adapter."
            )


def _per_expert_error(what: str) -> UserError:
    return UserError(
        f"the adapter adapts bare parameters ({what}, target_parameters): their factors hold "
        "one rank-r block per expert, and spectra of such updates are not implemented."
    )


def _dora_error(what: str) -> UserError:
    return UserError(
        f"the adapter {what} is a DoRA adapter (use_dora): its update f (W0 + s B A) - W0 "
        "rescales whole rows and is not the low-rank s B A, so a spectrum of B A would "
        "mislead; spectra of DoRA updates are not implemented here. To analyse its whole "
        "update, merge it and compare the merged model with its base: lorakit merge --model "
        "MODEL --adapter DIR --output MERGED, then lorakit analyze --base MODEL --finetuned "
        "MERGED."
    )


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key reading digit runs as numbers: ``layers.2`` before ``layers.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]
