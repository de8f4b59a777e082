"""``lorakit export SOURCE --format gguf --output FILE.gguf``: files llama.cpp and Ollama read.

- SOURCE an adapter directory: a GGUF LoRA adapter (``lorakit.export.gguf_adapter``) for the
  base ``--model`` (only its architecture is read: no weights load).
- SOURCE a model spec: a full GGUF model (``lorakit.export.gguf_model``), merged with
  ``--adapter`` first when given (``W = W0 + s B A``, lorakit's exact merge).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.eval import add_base_mismatch_option
from lorakit.errors import UserError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write an adapter or a (merged) model as GGUF for llama.cpp / Ollama",
        description=(
            "An adapter directory becomes a GGUF LoRA adapter (each module's scale folded in, so "
            "llama.cpp's alpha/rank rule is exact); a model spec becomes a full GGUF model, "
            "merged with --adapter first when given."
        ),
    )
    parser.add_argument("source", help="adapter directory (PEFT format), or a model spec")
    parser.add_argument("--format", required=True, choices=["gguf"], help="output format")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the adapter's base model spec, for an adapter SOURCE (default: %(default)s)",
    )
    parser.add_argument("--adapter", help="for a model SOURCE: merge this adapter in first")
    add_base_mismatch_option(parser)
    parser.add_argument(
        "--type",
        choices=TYPES,
        help="tensor type (default: f32 for an adapter, which allows f32/f16/bf16; f16 for a "
        "model; q8_0/q4_0 quantise rows of a multiple of 32 values, others are f16)",
    )
    parser.add_argument(
        "--drop-unsupported",
        action="store_true",
        help="export an adapter without what llama.cpp cannot apply (trained biases, "
        "modules_to_save copies, ...), listing what is dropped, instead of refusing it",
    )
    parser.set_defaults(func=run)


def _is_adapter(source: str) -> bool:
    """An adapter directory, or one holding its adapter as ``default/`` (PEFT's layout, as
    ``read_adapter`` takes it)."""
    return any((Path(source, *sub) / "adapter_config.json").is_file() for sub in ((), ("default",)))


def run(args: argparse.Namespace) -> int:
    if not args.output.endswith(".gguf"):
        raise UserError(f"--output {args.output}: give a file name ending in .gguf")
    if _is_adapter(args.source):
        if args.adapter:
            raise UserError("--adapter goes with a model SOURCE; SOURCE is already an adapter")
        return _export_adapter(args)
    if args.drop_unsupported:
        raise UserError("--drop-unsupported goes with an adapter SOURCE")
    return _export_model(args)


def _export_adapter(args: argparse.Namespace) -> int:
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.meta_model import build_meta_model

    base, _ = build_meta_model(args.model)  # shapes and architecture only
    done = export_adapter(
        args.source,
        base,
        args.output,
        drop_unsupported=args.drop_unsupported,
        tensor_type=args.type or "f32",
    )
    for dropped in done.dropped:
        print(f"lorakit: dropped {dropped}")
    print(
        f"GGUF LoRA adapter ({done.arch}, {len(done.modules)} modules, alpha {done.alpha:g}) "
        f"written to {done.path}"
    )
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from lorakit.commands.eval import load_model_and_adapter
    from lorakit.export.gguf_model import export_model
    from lorakit.merge import merge_and_unload
    from lorakit.models import builtin_gguf_file

    model, tokenizer = load_model_and_adapter(args.source, args.adapter, args.allow_base_mismatch)
    if args.adapter:
        model = merge_and_unload(model)
    path = export_model(
        model,
        args.output,
        args.type or "f16",
        tokenizer=tokenizer,
        tokenizer_gguf=builtin_gguf_file(args.source),
        name=Path(args.source).name,
    )
    merged = f" merged with {args.adapter}" if args.adapter else ""
    print(f"GGUF model ({args.type or 'f16'}){merged} written to {path}")
    return 0
