"""``lorakit export SOURCE --format gguf --output FILE.gguf``: files llama.cpp and Ollama read.

- SOURCE an adapter directory: a GGUF LoRA adapter (``lorakit.export.gguf_adapter``) for the
  base ``--model`` (only its architecture is read: no weights load).
- SOURCE a model spec: a full GGUF model (``lorakit.export.gguf_model``), merged with
  ``--adapter`` first when given (``W = W0 + s B A``, lorakit's exact merge).

An option that does nothing for the SOURCE given (``--model`` for a model, ``--adapter`` and
``--allow-base-mismatch`` for an adapter) is refused; ``--output`` is checked before anything
loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands._model_options import add_base_mismatch_option, check_base_mismatch_option
from lorakit.commands.extract import add_overwrite_option
from lorakit.errors import UserError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_BASE = "smollm2-135m-instruct"


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
    add_overwrite_option(
        parser,
        help="replace an existing --output file (written atomically; without it, an existing "
        "--output is refused)",
    )
    parser.add_argument(
        "--model",
        help=f"the adapter's base model spec, for an adapter SOURCE (default: {DEFAULT_BASE})",
    )
    parser.add_argument("--adapter", help="for a model SOURCE: merge this adapter in first")
    add_base_mismatch_option(parser)  # (for --adapter: an adapter SOURCE loads no base weights)
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
    parser.add_argument(
        "--gguf-pre",
        metavar="NAME",
        help="for a model SOURCE: the tokenizer.ggml.pre to write (llama.cpp's pre-tokenizer "
        "name, e.g. gpt-2, llama-bpe, qwen2, smollm) when lorakit does not recognise the "
        "tokenizer's own pre-tokenizer; check llama.cpp's tokens after",
    )
    parser.set_defaults(func=run)


def _is_adapter(source: str) -> bool:
    """An adapter directory, one holding its adapter as ``default/`` (PEFT's layout, as
    ``read_adapter`` takes it), or a directory that is no model and holds named adapters
    (``SOURCE/<name>/``, as PEFT saves adapters other than "default": refused with their names
    by ``_check_adapter_source``)."""
    path = Path(source)
    if any((path / sub / "adapter_config.json").is_file() for sub in ("", "default")):
        return True
    if _is_model(source) or not path.is_dir():
        return False
    try:
        return any((sub / "adapter_config.json").is_file() for sub in path.iterdir())
    except OSError:
        return False


def _is_model(source: str) -> bool:
    """A model spec as ``lorakit.models.resolve_model`` takes it: a built-in name or a
    directory holding ``config.json``."""
    from lorakit.models import BUILTIN_MODELS

    return source in BUILTIN_MODELS or (Path(source).expanduser() / "config.json").is_file()


def run(args: argparse.Namespace) -> int:
    from lorakit.commands.extract import refuse_empty, refuse_output_onto_inputs
    from lorakit.export.gguf_io import check_output_path

    refuse_empty("--output", args.output, "give the .gguf file to write")
    refuse_empty("SOURCE", args.source, "give an adapter directory or a model spec")
    refuse_empty(
        "--adapter", args.adapter, "give the adapter directory to merge in, or leave --adapter out"
    )
    if not args.output.endswith(".gguf"):
        raise UserError(f"--output {args.output}: give a file name ending in .gguf")
    inputs = [("SOURCE", args.source)] + ([("--adapter", args.adapter)] if args.adapter else [])
    refuse_output_onto_inputs("export", args.output, inputs)  # (a .gguf --adapter)
    check_output_path(args.output, overwrite=args.overwrite)  # before anything loads
    if _is_adapter(args.source):
        _check_adapter_source(args)
        return _export_adapter(args)
    if args.model is not None or args.drop_unsupported:
        _refuse_non_adapter_source(args)  # an adapter SOURCE was meant
    _check_model_source(args)
    return _export_model(args)


def _refuse_non_adapter_source(args: argparse.Namespace) -> None:
    """With --model or --drop-unsupported (options of an adapter SOURCE), a SOURCE that is no
    model spec was meant as an adapter: raise why it is none (``AdapterFileError`` from
    ``lorakit.io.adapter_dirs.adapter_directory``: missing, or no ``adapter_config.json``)."""
    from lorakit.io.adapter_dirs import adapter_directory

    if _is_model(args.source):
        return  # _check_model_source says which option goes with an adapter SOURCE
    adapter_directory(args.source)  # raises for anything _is_adapter did not take
    raise UserError(
        f"SOURCE {args.source} holds no adapter_config.json: give an adapter directory "
        "(saved by lorakit or peft) with --model, or a model spec without it"
    )


def _check_adapter_source(args: argparse.Namespace) -> None:
    """Refuse the options that do nothing for an adapter SOURCE (only the base's architecture
    is read, so no base weights are there to check the adapter against)."""
    from lorakit.io.adapter_dirs import adapter_directory

    if args.adapter:
        raise UserError("--adapter goes with a model SOURCE; SOURCE is already an adapter")
    if args.gguf_pre is not None:
        raise UserError(
            "--gguf-pre goes with a model SOURCE (it names the model file's pre-tokenizer); an "
            "adapter file has no tokenizer: leave it out"
        )
    if args.allow_base_mismatch:
        raise UserError(
            "--allow-base-mismatch goes with a model SOURCE and --adapter: an adapter SOURCE is "
            "exported without loading the base's weights, so there is no fingerprint to check; "
            "leave it out"
        )
    adapter_directory(args.source)  # named adapters (SOURCE/<name>/) are refused with names


def _check_model_source(args: argparse.Namespace) -> None:
    """Refuse the options that do nothing for a model SOURCE, and a --gguf-pre that llama.cpp
    does not know."""
    if args.drop_unsupported:
        raise UserError("--drop-unsupported goes with an adapter SOURCE")
    if args.model is not None:
        shadowed = ""
        if Path(args.source).is_dir() and not (Path(args.source) / "config.json").is_file():
            shadowed = (
                f" (the built-in model {args.source}; for the local directory of that name "
                f"give ./{args.source}/<adapter directory>)"
            )
        raise UserError(
            f"--model goes with an adapter SOURCE (its base); SOURCE {args.source} is the model "
            f"exported{shadowed}: leave --model out"
        )
    check_base_mismatch_option(args)
    if args.gguf_pre is not None:
        from lorakit.export.gguf_tokenizer import check_pre_tokenizer_name

        check_pre_tokenizer_name(args.gguf_pre)  # (a name llama.cpp refuses) before loading


def _export_adapter(args: argparse.Namespace) -> int:
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.meta_model import build_meta_model

    # Shapes and architecture only: the base's dtype does not reach the file (--type does), so
    # its config's dtype (even "auto", or one torch lacks) is not read.
    base, _ = build_meta_model(args.model or DEFAULT_BASE, "float32")
    done = export_adapter(
        args.source,
        base,
        args.output,
        drop_unsupported=args.drop_unsupported,
        tensor_type=args.type or "f32",
        base_name=(
            f"--model {args.model}"
            if args.model
            else f"the default base {DEFAULT_BASE} (no --model given)"
        ),
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
    from lorakit.models import builtin_gguf_file

    model, tokenizer = load_model_and_adapter(
        args.source,
        args.adapter,
        args.allow_base_mismatch,
        quantized_base_hint=_merge_first_hint(args.source, args.adapter),
    )
    if args.adapter:
        model = _merged(model)
    path = export_model(
        model,
        args.output,
        args.type or "f16",
        tokenizer=tokenizer,
        tokenizer_gguf=builtin_gguf_file(args.source),
        name=Path(args.source).name,
        pre_tokenizer=args.gguf_pre,
    )
    merged = f" merged with {args.adapter}" if args.adapter else ""
    print(f"GGUF model ({args.type or 'f16'}){merged} written to {path}")
    return 0


def _merge_first_hint(source: str, adapter: str | None) -> str:
    """How to export an adapter trained on a quantized base (``eval.load_model_and_adapter``'s
    ``quantized_base_hint``, ``{option}`` its ``--quantization``; the refusal has named
    ``--allow-base-mismatch`` already): export has no ``--quantization`` (it loads the float
    base), but ``lorakit merge`` has."""
    from shlex import quote

    merge = f"lorakit merge --model {quote(source)} --adapter {quote(str(adapter))}"
    return (
        " It was trained on a quantized base, which lorakit export does not load: merge it on "
        f"that base first ({merge} --quantization {{option}} --output MERGED_DIR), then export "
        "MERGED_DIR."
    )


def _merged(model):
    """``merge_and_unload(model)``; a merge lorakit refuses (``ValueError``: a bias on lora_B
    with no base bias to add it to, non-finite values) becomes ``UserError("cannot merge: ...")``
    as in ``lorakit merge``, before any file is written. The unmerged route that such a
    message may advise is closed here: llama.cpp's LoRA format cannot carry a lora_B bias or
    non-finite values either (``gguf_adapter`` refuses them)."""
    from lorakit.merge import merge_and_unload

    try:
        return merge_and_unload(model)
    except ValueError as error:
        reason = str(error).removesuffix(" use the adapter unmerged.").rstrip("; .")
        raise UserError(
            f"cannot merge: {reason}. No GGUF file can hold this adapter: a GGUF model needs "
            "it merged, and a GGUF LoRA adapter cannot carry it either. Run it unmerged with "
            "lorakit or transformers instead (no file was written)."
        ) from None
