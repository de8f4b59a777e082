"""``lorakit eval``: loss and accuracy of a model (+ optional adapter) on data.

Also ``load_model_and_adapter``, which the commands that run a model share (their options:
``commands._model_options``, whose names this module re-exports)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings

from lorakit.commands._model_options import (
    add_base_mismatch_option,
    add_bnb_cpu_kernel_option,
    add_dtype_option,
    add_quantization_option,
    apply_bnb_cpu_kernel,
    bnb_double_quantization,
    check_base_mismatch_option,
    check_bnb_cpu_kernel,
    torch_dtype,
)
from lorakit.errors import UserError

__all__ = ["add_model_options", "load_model_and_adapter", "load_model_for", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss / accuracy of a model (+ adapter) on data",
        description=(
            "Mean loss per answer token on the data and, for classification data (examples with "
            "choices, e.g. rotten-tomatoes), accuracy by comparing the choices' next-token "
            "scores (their whole answers' where first tokens are shared); otherwise exact-match accuracy of the answers (teacher forcing). Prints "
            "JSON: examples, truncated (how many --max-length shortened, also warned about on "
            "stderr), loss, accuracy, accuracy_kind."
        ),
    )
    add_model_options(parser, "adapter directory (PEFT format); default: the base model alone")
    parser.add_argument(
        "--data", required=True, help="rotten-tomatoes, chatterbot, a .jsonl or a .csv file"
    )
    parser.add_argument("--split", help="train/validation/test/all (built-ins default: test)")
    parser.add_argument(
        "--style",
        choices=["chat", "plain"],
        help="prompt form for built-ins and CSV (a JSONL file says its own and ignores it) "
        "(default: the form --adapter was trained on, which lorakit train records in it; "
        "without that record, chat for built-ins and plain for CSV)",
    )
    parser.add_argument("--limit", type=int, help="only the first N examples (default: all)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="examples per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="maximum tokens per example; longer reviews (classification data) "
        "are shortened inside the template, other examples lose their start; at most the "
        "model's positions for a learned position table such as GPT-2's "
        "(default: %(default)s)",
    )
    parser.set_defaults(func=run)


def add_model_options(parser: argparse.ArgumentParser, adapter_help: str) -> None:
    """``--model``, ``--adapter`` (``adapter_help``) and the options of a command that runs
    the model it loads (``commands._model_options``): ``eval``'s and ``generate``'s, which load
    with ``load_model_for``."""
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model spec (default: %(default)s)"
    )
    parser.add_argument("--adapter", help=adapter_help)
    add_base_mismatch_option(parser)
    add_quantization_option(parser)
    add_bnb_cpu_kernel_option(parser)
    add_dtype_option(parser)


def load_model_for(args: argparse.Namespace):
    """``(model, tokenizer)`` for the options of ``add_model_options`` (checked first by
    ``check_bnb_cpu_kernel`` and ``check_base_mismatch_option``): ``load_model_and_adapter``,
    then ``--bnb-cpu-kernel`` applied to the loaded layers."""
    model, tokenizer = load_model_and_adapter(
        args.model, args.adapter, args.allow_base_mismatch, args.quantization, args.dtype
    )
    apply_bnb_cpu_kernel(args, model)
    return model, tokenizer


PASS_QUANTIZATION = " It was trained on a quantized base: pass --quantization {option}."


def load_model_and_adapter(
    model_spec: str,
    adapter: str | None,
    allow_base_mismatch: bool = False,
    quantization: str | None = None,
    dtype: str = "float32",
    quantized_base_hint: str = PASS_QUANTIZATION,
):
    """``(model, tokenizer)`` with the adapter loaded (and active) when one is given. The
    adapter files are read and checked before the model loads (a wrong path fails at once).
    ``quantization``: load the base quantized; ``dtype`` (a name of ``DTYPES``): the base's
    dtype (``lorakit.models.load_model``); the adapter is float32 on a 16-bit base
    (``lorakit.layer_wrapping.default_adapter_dtype``). ``nf4`` / ``fp4`` load with double
    quantization unless the adapter's fingerprint records a base without it
    (``bnb_double_quantization``: then without, one info line says so). Returned in eval mode,
    frozen.
    ``quantized_base_hint``: the way out, ``{option}`` the ``--quantization`` to name, that ends
    the refusal of an adapter trained on a base quantized otherwise (``_quantization_hint``)."""
    from lorakit.errors import BaseModelMismatchError, UserError
    from lorakit.io import load_adapter, read_adapter
    from lorakit.models import builtin_gguf_file, check_model_spec, load_model

    check_model_spec(model_spec)
    if quantization is not None:
        from lorakit.quantized.loading import check_quantization

        check_quantization(quantization, builtin_gguf_file(str(model_spec)))
    double_quantization = True  # (nf4 / fp4: unless the adapter was trained without it)
    if adapter and not adapter.endswith(".gguf"):  # a GGUF LoRA file is checked on load
        recorded = read_adapter(adapter).fingerprint
        double_quantization = bnb_double_quantization(recorded, quantization)
    model, tokenizer = load_model(
        model_spec,
        progress=False,
        quantization=quantization,
        dtype=torch_dtype(dtype),
        double_quantization=double_quantization,
    )
    if adapter:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_adapter(model, adapter, activate=True, allow_base_mismatch=allow_base_mismatch)
        except BaseModelMismatchError as error:
            hint = _quantization_hint(str(error), quantization, quantized_base_hint)
            raise BaseModelMismatchError(_flag_spelling(str(error)) + hint) from None
        except ValueError as error:  # a layer of this model cannot take the adapter's kind
            base = f"{model_spec} (--quantization {quantization})" if quantization else model_spec
            raise UserError(f"cannot load adapter {adapter} on {base}: {error}") from None
        for warning in caught:  # one clean line each, not Python's warning with a file path
            print(f"lorakit: warning: {_flag_spelling(str(warning.message))}", file=sys.stderr)
    model.requires_grad_(False)  # run, never trained here (DoRA's cache then checks no values)
    return model.eval(), tokenizer


# a fingerprint's format name (its start) -> --quantization; nf4 / fp4 load bnb-nf4 and
# bnb-nf4-dq alike (without double quantization where the adapter records it so)
_QUANTIZATION_OF_FORMAT = (
    ("bnb-nf4", "nf4"),
    ("bnb-fp4", "fp4"),
    ("bnb-int8", "int8"),
    ("gguf-", "gguf"),
    ("int8-rows", "int8-rows"),
    ("int4-groups", "int4-groups"),
)


def _quantization_hint(message: str, quantization: str | None, hint: str) -> str:
    """For a mismatch that is the base's format (``fingerprint``: "the adapter was trained on
    a bnb-nf4-dq base, this base is float32"), ``hint`` naming the ``--quantization`` that
    loads the base as the adapter was trained (its ``{option}``); else ""."""
    found = re.search(r"trained on an? (\S+) base, this base is", message)
    for prefix, option in _QUANTIZATION_OF_FORMAT if found else ():
        if found.group(1).startswith(prefix) and option != quantization:
            return hint.replace("{option}", option)
    return ""


def _flag_spelling(message: str) -> str:
    """A library message as the CLI says it: the flag, not the Python argument."""
    return message.replace("allow_base_mismatch=True", "--allow-base-mismatch")


def _check_choices(args: argparse.Namespace, examples, tokenizer) -> None:
    """``UserError`` naming ``--data`` and the way out when the answer words cannot be scored:
    fewer than two, two that tokenise to the same answer, or (scored whole, where first tokens
    are shared) an answer too long to fit in ``--max-length`` with a prompt token
    (``check_whole_answers_fit``: scoring would run past the limit, past GPT-2's positions)."""
    from lorakit.data.scoring import (
        check_whole_answers_fit,
        choice_answer_ids,
        whole_answers_needed,
    )

    example = examples[0]
    try:
        choice_answer_ids(example.choices, tokenizer, example)
    except UserError as error:
        raise UserError(
            f"--data {args.data}: {error}. Rename the labels in the file to distinct answer "
            "words (e.g. 0 -> negative, 1 -> positive)"
        ) from None
    try:
        if whole_answers_needed(examples, tokenizer):
            check_whole_answers_fit(examples, tokenizer, args.max_length, option="--max-length")
    except UserError as error:
        raise UserError(f"--data {args.data}: {error}") from None


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length < 2:
        raise UserError(f"--max-length must be >= 2, got {args.max_length}")
    from lorakit import data
    from lorakit.commands.extract import refuse_empty
    from lorakit.commands.generate import ADAPTER_WAY_OUT, recorded_prompt_style
    from lorakit.positions import check_max_length
    from lorakit.train.losses import evaluate
    from lorakit.train.settings import load_examples_for

    refuse_empty("--adapter", args.adapter, ADAPTER_WAY_OUT)
    check_bnb_cpu_kernel(args)
    check_base_mismatch_option(args)
    style = args.style or recorded_prompt_style(args.adapter)  # (as lorakit generate follows it)
    examples = load_examples_for(args.data, args.split, style, "test")[: args.limit]
    model, tokenizer = load_model_for(args)  # (--bnb-cpu-kernel: the scores need no gradient)
    check_max_length(model, args.max_length)  # GPT-2's position table: no longer examples
    if examples and all(example.choices for example in examples):
        _check_choices(args, examples, tokenizer)  # before the loss pass, not after it
    tokenized = data.tokenize_examples(examples, tokenizer, args.max_length)
    if tokenized.num_truncated:  # as lorakit train says it (train/run.py:_announce)
        print(
            f"lorakit: warning: {tokenized.num_truncated} of {len(tokenized)} evaluation "
            f"examples are longer than --max-length {args.max_length} tokens and were "
            "shortened; raise --max-length to evaluate them whole",
            file=sys.stderr,
        )
    order = data.length_grouped_batches(tokenized.lengths, args.batch_size, shuffle=False)
    results = evaluate(model, (data.collate(tokenized, indices) for indices in order))
    report = {
        "examples": len(examples),
        "truncated": tokenized.num_truncated,
        "loss": results["loss"],
    }
    if all(example.choices for example in examples):
        scored = data.classify(
            model, tokenizer, examples, batch_size=args.batch_size, max_length=args.max_length
        )
        report["accuracy"] = scored.accuracy
        report["accuracy_kind"] = (
            "choice scoring of whole answers" if scored.whole_answers else "choice scoring"
        )
    else:
        report["accuracy"] = results["accuracy"]
        report["accuracy_kind"] = "exact match of the answer tokens"
    print(json.dumps(report))
    return 0
