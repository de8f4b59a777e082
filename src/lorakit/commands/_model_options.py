"""The options of the commands that load a model to run it (``eval``, ``generate``,
``serve``, ``merge``, ``export``) and their checks: ``--allow-base-mismatch`` (only with
``--adapter``), ``--quantization``, ``--bnb-cpu-kernel`` (refused before the model loads where
it cannot apply; applied once the adapters are in place) and ``--dtype`` (``DTYPES``, read by
``torch_dtype``), and ``bnb_double_quantization``: whether ``--quantization nf4`` / ``fp4``
loads the base with bitsandbytes' double quantization, as the adapter to load was trained.

A helper of the command modules (its leading underscore keeps it out of the command list:
``lorakit.cli.command_modules``); torch and bitsandbytes are imported only inside functions.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.errors import UserError
from lorakit.quantization_names import QUANTIZATIONS

__all__ = [
    "DTYPES",
    "add_base_mismatch_option",
    "add_bnb_cpu_kernel_option",
    "add_dtype_option",
    "add_quantization_option",
    "apply_bnb_cpu_kernel",
    "bnb_double_quantization",
    "check_base_mismatch_option",
    "check_bnb_cpu_kernel",
    "torch_dtype",
]

DTYPES = ("float32", "bfloat16", "float16")
"""The ``--dtype`` choices of the commands that load a model to run it (eval, generate, serve)."""


def add_base_mismatch_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-base-mismatch``, for commands that load an adapter onto ``--model``."""
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load the adapter even if the base-model fingerprint saved with it does not match "
        "--model (a warning is printed)",
    )


def check_base_mismatch_option(args: argparse.Namespace) -> None:
    """``--allow-base-mismatch`` without ``--adapter`` relaxes nothing: refused, so that a user
    who passes it does not believe a check was relaxed (review 33)."""
    if args.allow_base_mismatch and not args.adapter:
        raise UserError("--allow-base-mismatch goes with --adapter (no adapter is loaded)")


def add_quantization_option(parser: argparse.ArgumentParser) -> None:
    """``--quantization``: load ``--model`` as a quantized base (docs/quantized.md)."""
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="load --model quantized, as an adapter trained with lorakit train --quantization "
        "needs: nf4, fp4, int8 (bitsandbytes, on the CPU) or gguf (a built-in model's GGUF "
        "blocks); or int8-rows (lorakit's weight-only int8 of every linear layer: fast CPU "
        "decoding, outputs close to float32's) or int4-groups (4-bit with a scale and offset "
        "per 32 inputs, Q4_1's scheme: the fastest CPU decoding) (default: float)",
    )


def bnb_double_quantization(fingerprint: dict | None, quantization: str | None) -> bool:
    """Whether ``--quantization`` (``nf4`` / ``fp4``) loads the base with double quantization,
    for an adapter whose base fingerprint is ``fingerprint`` (module -> entry; None: none
    saved): False only when its entries record that format without it (``bnb-nf4``, not
    ``bnb-nf4-dq``: a base loaded with ``BitsAndBytesConfig(load_in_4bit=True)``, PEFT's usual
    setting) and none with it, so that the CLI loads the base the adapter was trained on (one
    info line on stderr says so); True otherwise (QLoRA's choice, the CLI's default)."""
    if quantization not in ("nf4", "fp4") or not fingerprint:
        return True
    formats = {str(entry.get("dtype")) for entry in fingerprint.values()}
    plain = f"bnb-{quantization}"
    if plain not in formats or f"{plain}-dq" in formats:
        return True
    print(
        f"lorakit: the adapter was trained on a {plain} base without double quantization: "
        f"--quantization {quantization} loads --model that way",
        file=sys.stderr,
    )
    return False


def add_bnb_cpu_kernel_option(parser: argparse.ArgumentParser) -> None:
    """``--bnb-cpu-kernel``: bitsandbytes' packed CPU kernel for the 4-bit layers (inference
    only; ``lorakit.quantized.bnb_cpu_kernel``)."""
    parser.add_argument(
        "--bnb-cpu-kernel",
        action="store_true",
        help="with --quantization nf4 or fp4 on a CPU with AVX512-BF16: run the 4-bit layers "
        "through bitsandbytes' packed CPU kernel, as PEFT runs them there by default (about "
        "1.4x faster decode and prefill; the block scales are rounded to bfloat16 and the "
        "products run in bfloat16, outputs about 3e-3 off the exact ones)",
    )


def check_bnb_cpu_kernel(args: argparse.Namespace) -> None:
    """``UserError`` before the model loads when ``--bnb-cpu-kernel`` cannot apply."""
    if not getattr(args, "bnb_cpu_kernel", False):
        return
    from lorakit.errors import UserError

    if args.quantization not in ("nf4", "fp4"):
        raise UserError(
            "--bnb-cpu-kernel runs bitsandbytes' 4-bit layers: add --quantization nf4 or fp4"
        )
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        raise UserError(
            "--bnb-cpu-kernel: bitsandbytes' packed 4-bit kernel needs a CPU with AVX512-BF16, "
            "which this one lacks; leave the option out"
        )


def apply_bnb_cpu_kernel(args: argparse.Namespace, model) -> None:
    """With ``--bnb-cpu-kernel``, repack ``model``'s 4-bit layers for bitsandbytes' CPU kernel
    (``use_bnb_cpu_kernel``): after its adapters or LoRA layers are in place, since a
    repacked layer only runs."""
    if getattr(args, "bnb_cpu_kernel", False):
        from lorakit.quantized.bnb_cpu_kernel import use_bnb_cpu_kernel

        use_bnb_cpu_kernel(model)


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the dtype of ``--model``'s weights and compute (``DTYPES``)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the base model's weights and compute: bfloat16 halves the base's memory "
        "and, on CPUs with AVX512-BF16 or AMX, runs its matmuls several times faster than "
        "float32 (outputs differ by bfloat16's rounding); adapters stay float32 (default: "
        "%(default)s)",
    )


def torch_dtype(name: str):
    """The ``torch.dtype`` of a ``--dtype`` name (one of ``DTYPES``)."""
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)
