"""``lorakit extract``: a full fine-tune -> a PEFT-format LoRA adapter by truncated SVD.

lorakit extract --base DIR --finetuned DIR --output DIR (--rank R | --energy 0.9) [--max-rank R]

Also the ``--output`` checks the commands writing a result share: ``check_adapter_output``
(``combine``), ``refuse_output_onto_inputs`` (``combine``, ``merge``, ``export``),
``removed_if_left_empty`` (``combine``) and ``refuse_empty`` (every command's ``--output``,
``--adapter`` and ``--adapters``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorakit.errors import UserError
from lorakit.model_specs import recorded_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="extract a LoRA adapter from a fully fine-tuned model (truncated SVD of ΔW)",
        description="For every linear layer, ΔW = W_ft - W0 is cut to its best rank-r "
        "approximation s·B·A and saved as a PEFT-format adapter for the base model. The rank is "
        "fixed (--rank) or chosen per layer to keep a share of ||ΔW||_F^2 (--energy, written "
        "with rank_pattern). Prints each layer's relative Frobenius error and the adapter size.",
    )
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--finetuned", required=True, help="fully fine-tuned model directory")
    parser.add_argument("--output", required=True, help="directory for the adapter")
    add_overwrite_option(parser)
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rank", type=int, help="the same rank r for every layer")
    choice.add_argument("--energy", type=float, help="per-layer rank keeping this energy share")
    parser.add_argument("--max-rank", type=int, help="cap on the per-layer rank with --energy")
    parser.add_argument("--task", choices=["causal-lm", "seq-cls"], help="model class to load")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def refuse_empty(name: str, value: str | None, way_out: str) -> None:
    """``UserError("NAME is empty; WAY_OUT")`` for a path option given as "" or blanks (an unset
    shell variable: ``--output "$OUT"``): read as a path it is the current directory (a result
    written into it, an adapter read from it) or a blank-named directory, never what was meant.
    None (the option not given) passes."""
    if value is not None and not value.strip():
        raise UserError(f"{name} is empty; {way_out}")


def _check(args: argparse.Namespace) -> None:
    refuse_empty("extract: --output", args.output, "give a directory for the adapter")
    if args.rank is not None and args.rank < 1:
        raise UserError(f"extract: --rank must be a positive integer, got {args.rank}")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise UserError(f"extract: --energy must be in (0, 1], got {args.energy}")
    if args.max_rank is not None and (args.max_rank < 1 or args.energy is None):
        raise UserError("extract: --max-rank needs --energy and a positive integer")
    check_adapter_output(
        "extract", Path(args.output), args.overwrite
    )  # (--base and --finetuned are models)


def add_overwrite_option(
    parser: argparse.ArgumentParser,
    help: str = "replace an adapter already in --output (written atomically; without it, such "
    "an --output is refused)",
) -> None:
    """``--overwrite``: replace what ``--output`` already holds (else refused); ``help`` says
    what that is for the command (default: an adapter in the ``--output`` directory)."""
    parser.add_argument("--overwrite", action="store_true", help=help)


def check_adapter_output(command: str, output: Path, overwrite: bool = False) -> None:
    """Refuse an adapter's ``--output`` that is a file, a model directory (it holds
    ``config.json``: transformers would apply the adapter whenever it loads that model) or a
    directory already holding an adapter (``adapter_config.json`` or
    ``adapter_model.safetensors``, which the save would replace, unless ``overwrite``; other
    files are kept); ``command`` begins the message
    (``extract``, ``combine``). Checked before any model or adapter loads."""
    if output.exists() and not output.is_dir():
        raise UserError(f"{command}: --output {output} is a file; give a directory")
    if (output / "config.json").is_file():  # transformers would apply the adapter on loading
        raise UserError(
            f"{command}: --output {output} is a model directory; write the adapter into its own "
            "directory (a model directory holding an adapter loads with the adapter applied)"
        )
    held = [] if overwrite else _adapter_files_in(output)
    if held:
        raise UserError(
            f"{command}: --output {output} holds an adapter ({', '.join(held)}); give another "
            "--output, remove it, or pass --overwrite to replace it"
        )


def _adapter_files_in(directory: Path) -> list[str]:
    """The adapter files ``directory`` holds that a save writes (``adapter_config.json``,
    ``adapter_model.safetensors``), sorted; none when it is not a readable directory (the save
    says why)."""
    from lorakit.io.config_json import CONFIG_NAME
    from lorakit.io.read import WEIGHTS_NAME

    return sorted(name for name in (CONFIG_NAME, WEIGHTS_NAME) if (directory / name).exists())


def refuse_output_onto_inputs(
    command: str, output: str, inputs: Iterable[tuple[str, str | os.PathLike[str]]]
) -> None:
    """Refuse an ``--output`` that is one of the command's ``inputs`` (``(flag, path)``), or an
    input's ``default/`` (where PEFT's layout keeps an adapter): the result would replace what
    it is made from. Checked before anything loads; paths that do not exist never match."""
    target = Path(output).expanduser()
    for flag, path in inputs:
        source = Path(path).expanduser()
        if _same_path(target, source) or _same_path(target, source / "default"):
            raise UserError(
                f"{command}: --output {output} is {flag} {path}; the result would replace it: "
                "give another --output"
            )


def _same_path(first: Path, second: Path) -> bool:
    """Whether both exist and are one directory or file (``os.path.samefile``: links and ``..``
    seen through)."""
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:  # (a name the file system refuses)
        return False


@contextlib.contextmanager
def removed_if_left_empty(output: str | os.PathLike[str]) -> Iterator[None]:
    """Around the writing of ``output``: when it fails (a full disk, an interrupt) and this run
    created ``output``, the directory is removed again if it is still empty, so a failed run
    leaves nothing behind."""
    directory = Path(output)
    existed = directory.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # (not empty, or already gone: left as it is)
                directory.rmdir()
        raise


def _print_report(extraction) -> None:
    print(f"{'layer':<52} {'rank':>5} {'rel. error':>11}")
    for layer in extraction.layers:
        print(f"{layer.name:<52} {layer.rank:>5} {layer.relative_error:>11.4f}")
    from lorakit.units import format_bytes

    size = format_bytes(4 * extraction.parameters)
    print(
        f"\nadapter: {extraction.parameters:,} parameters ({size} in float32), "
        f"{_against_dense(extraction.parameters, extraction.dense_parameters)}; "
        f"largest relative error {extraction.relative_error:.4f}"
    )
    one_sided = [n for n, c in extraction.uncaptured.items() if "only_in" in c]
    moved = [name for name in extraction.uncaptured if name not in one_sided]
    if moved:
        names = ", ".join(moved[:6])
        more = len(moved) - 6
        print(
            f"not captured by LoRA (changed outside linear weights): {names}"
            + (f" and {more} more" if more > 0 else "")
        )
    notes = {n: c["note"] for n, c in extraction.uncaptured.items() if "note" in c}
    tied = {n: note for n, note in notes.items() if note.startswith("tied to ")}
    if tied:
        print(
            "left out (a LoRA on a tied weight would change what it is tied to when merged): "
            + ", ".join(f"{name} ({note})" for name, note in tied.items())
        )
    for name, note in notes.items():  # a new head, weights newly initialised at loading
        if name not in tied and name not in one_sided:
            print(f"left out: {name}: {note}")
    _print_one_sided(extraction.uncaptured, one_sided)


def _print_one_sided(uncaptured: dict[str, dict], names: list[str]) -> None:
    """The parameters only one model has (``one_sided.format_one_sided``: the first few)."""
    from lorakit.analysis.one_sided import OneSidedParameter, format_one_sided

    parameters = [
        OneSidedParameter(name, uncaptured[name]["only_in"], tuple(uncaptured[name]["shapes"]))
        for name in names
    ]
    for line in format_one_sided(parameters):
        print(line)


def _against_dense(parameters: int, dense: int) -> str:
    """The adapter's size against the dense update's d k parameters summed over its layers:
    "N.Nx fewer than", "N.Nx more than" (a layer of rank r > d k / (d + k) is larger than its
    ΔW: at r = min(d, k), (d + k) r >= d k) or "as many as" the dense update."""
    if parameters < dense:
        return f"{dense / parameters:.1f}x fewer than the dense update ({dense:,})"
    if parameters > dense:
        return f"{parameters / dense:.1f}x more than the dense update ({dense:,})"
    return f"as many as the dense update ({dense:,})"


def _warn_capped(extraction, rank: int | None, shown: int = 4) -> None:
    """On stderr: which layers had ``--rank`` above min(d, k) and got r = min(d, k) (the first
    ``shown`` named with their min(d, k), then a count), and why that costs more than it saves."""
    capped = [layer for layer in extraction.layers if layer.capped]
    if not capped:
        return
    names = ", ".join(f"{layer.name} ({min(layer.shape)})" for layer in capped[:shown])
    more = f" and {len(capped) - shown} more" if len(capped) > shown else ""
    print(
        f"lorakit extract: warning: --rank {rank} is above min(d, k) of {len(capped)} of "
        f"{len(extraction.layers)} layers, whose rank was capped to min(d, k): {names}{more}; "
        "a LoRA of rank min(d, k) has (d + k) r >= d k parameters, no fewer than the dense "
        "update: give a smaller --rank, or --energy",
        file=sys.stderr,
    )


def _written_config(directory: Path) -> dict:
    """The ``adapter_config.json`` just saved in ``directory``, as written (values the save
    works out, such as ``fan_in_fan_out`` true for GPT-2's ``Conv1D``, included)."""
    from lorakit.io.config_json import CONFIG_NAME, read_config_text

    return json.loads(read_config_text(directory / CONFIG_NAME))


def _is_causal_lm(model) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) and not model.config.is_encoder_decoder


def run(args: argparse.Namespace) -> int:
    _check(args)
    from lorakit.analysis.extract import apply_extraction, extract_lora, prefixed
    from lorakit.analysis.pairs import base_with_finetuned_head, load_pair, new_head_parameters
    from lorakit.io import save_adapter

    # (a base BertModel and a BertForSequenceClassification: their bodies are compared)
    pair = load_pair(args.base, args.finetuned, args.task, progress=False)
    try:
        extraction = extract_lora(
            pair.base,
            pair.finetuned,
            rank=args.rank,
            energy=args.energy,
            max_rank=args.max_rank,
            newly_initialised=pair.newly_initialised,
        )
    except ValueError as error:
        raise UserError(f"extract: {error}") from error
    # saved against a model of the fine-tune's class: the base's body, the fine-tune's head
    model = base_with_finetuned_head(pair)
    extraction = prefixed(extraction, pair.prefix, model)
    extraction.uncaptured |= new_head_parameters(pair)
    extraction.config.base_model_name_or_path = recorded_spec(args.base)  # the spec as given
    if _is_causal_lm(model):  # what peft's AutoPeftModelForCausalLM needs to open it
        extraction.config.task_type = "CAUSAL_LM"
    del pair
    model = apply_extraction(model, extraction)
    with removed_if_left_empty(args.output):
        directory = save_adapter(model, args.output)
    _warn_capped(extraction, args.rank)
    if args.json:
        report = {**extraction.to_dict(), "config": _written_config(directory)}
        print(json.dumps({**report, "output": str(directory)}, indent=2))
    else:
        _print_report(extraction)
        print(f"saved: {directory}")
    return 0
