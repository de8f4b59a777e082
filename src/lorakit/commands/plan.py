"""``lorakit plan MODEL``: parameter counts and memory of a LoRA setup, before any download or
training (the model is built on the meta device). See ``lorakit.plan``."""

from __future__ import annotations

import argparse

from lorakit.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="count LoRA parameters and estimate training/inference memory (no weights loaded)",
        description=(
            "Build MODEL on the meta device (no weights, no memory), add a LoRA adapter and print "
            "trainable parameters per module type, the adapter file size, the memory of LoRA "
            "vs. full fine-tuning and the activations one training step keeps for backward "
            "(GB = 1e9 bytes)."
        ),
    )
    parser.add_argument(
        "model",
        help="built-in name (llama-2-7b, smollm2-135m-instruct, minilm-l6), a transformers model "
        "directory with config.json, or a config.json file",
    )
    parser.add_argument("-r", "--rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    parser.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names (e.g. q_proj,v_proj) or 'all-linear' (default)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype of the frozen base (default: float32 for lorakit's built-in models, as "
        "lorakit loads them; else the config's)",
    )
    _add_memory_options(parser)
    _add_activation_options(parser)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(func=run)


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    """Serving several adapters, training on several devices, a quantized base."""
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--adapters",
        type=int,
        default=1,
        help="number of adapters served beside one base, for the inference estimate (default 1)",
    )
    group.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices (torchrun processes) to train on, for the per-device memory (default 1)",
    )
    group.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="how the devices share the model, as lorakit train --strategy (default ddp)",
    )
    group.add_argument(
        "--quantization",
        choices=("nf4", "fp4", "int8", "q4_0", "q4_1", "q8_0", "int8-rows", "int4-groups"),
        default=None,
        help="store the frozen base's linear layers quantized (bitsandbytes nf4/fp4 with double "
        "quantization, int8; GGUF q4_0/q4_1/q8_0: the output layer stays in --dtype; lorakit's "
        "CPU formats int8-rows and int4-groups: the output layer in int8 rows); embeddings and "
        "norms stay in --dtype (default: not quantized)",
    )


def _add_activation_options(parser: argparse.ArgumentParser) -> None:
    """The batch a training step runs on, for the activations it keeps."""
    group = parser.add_argument_group("activations")
    group.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="sequences per training step (per device), for the activations (default 1)",
    )
    group.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence, for the activations (default 2048, or the model's maximum "
        "when shorter)",
    )
    group.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="LoRA dropout: its masks add one bit per adapted layer's input element (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from lorakit.plan import plan
    from lorakit.plan_report import format_report

    if args.rank <= 0 or args.adapters < 0:
        raise UserError(
            f"--rank must be positive and --adapters non-negative "
            f"(got --rank {args.rank}, --adapters {args.adapters})"
        )
    targets = args.target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    result = plan(
        args.model,
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=targets,
        dtype=args.dtype,
        num_adapters=args.adapters,
        devices=args.devices,
        strategy=args.strategy,
        quantization=args.quantization,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_dropout=args.lora_dropout,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_report(result))
    return 0
