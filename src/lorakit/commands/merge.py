"""``lorakit merge``: fold an adapter into the base weights and save a plain transformers model."""

from __future__ import annotations

import argparse

from lorakit.commands._model_options import (
    DTYPES,
    add_base_mismatch_option,
    add_quantization_option,
)
from lorakit.commands.extract import refuse_empty, refuse_output_onto_inputs
from lorakit.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and save a standard transformers directory",
        description=(
            "W = W0 + s B A for every adapted layer, then save_pretrained: the result loads with "
            "transformers' AutoModel* alone, with no LoRA overhead at inference."
        ),
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="base model spec (default: %(default)s)"
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    add_base_mismatch_option(parser)
    add_quantization_option(parser)
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the merged model written; the base loads in float32 and each merged "
        "weight is the float32 sum W0 + s B A rounded once to it (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    refuse_empty("--output", args.output, "give a directory for the merged model")
    refuse_empty("--adapter", args.adapter, "give the adapter directory to merge")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory (new or existing)")
    refuse_output_onto_inputs("merge", args.output, [("--model", args.model)])
    from lorakit.model_specs import refuse_output_in_model_store

    refuse_output_in_model_store("merge", args.output)  # (a built-in's directory, say)
    from lorakit.commands._model_options import torch_dtype
    from lorakit.commands.eval import load_model_and_adapter
    from lorakit.io import save_merged_model
    from lorakit.io.merged import refuse_adapter_directory
    from lorakit.merge import merge_and_unload
    from lorakit.models import transformers_progress_bars

    refuse_adapter_directory(output)  # (--output is --adapter, say) before anything loads
    model, tokenizer = load_model_and_adapter(
        args.model, args.adapter, args.allow_base_mismatch, args.quantization
    )
    try:
        model = merge_and_unload(model, float_dtype=torch_dtype(args.dtype))
        with transformers_progress_bars(False):
            save_merged_model(model, args.output, tokenizer=tokenizer)
    except ValueError as error:  # e.g. a lora_bias adapter onto a base layer without a bias
        raise UserError(f"cannot merge: {error}") from None
    print(f"merged model ({args.dtype}) saved to {output.resolve()}")
    return 0
