"""``lorakit combine``: several adapter directories and weights -> one PEFT-format adapter.

lorakit combine A B [C ...] [--weights 0.7 0.3 ...] [--method cat|svd|ties|dare_linear|dare_ties|
    magnitude_prune] [--rank R] [--density D] [--majority-sign total|frequency] [--seed S]
    --output DIR [--json]

No base model is loaded: the adapters' files carry what is needed (docs/combining.md).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorakit.commands.extract import (
    add_overwrite_option,
    check_adapter_output,
    refuse_empty,
    refuse_output_onto_inputs,
    removed_if_left_empty,
)
from lorakit.errors import UserError

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "combine",
        help="combine adapters into one (exact cat, SVD to a rank, TIES/DARE on ΔW)",
        description="Per module, ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ over the adapters that adapt it. cat keeps "
        "it exactly (rank Σ rᵢ); svd cuts it to --rank; ties, dare_linear, dare_ties and "
        "magnitude_prune combine the full updates (keeping --density of the entries) and cut "
        "the result to --rank. Prints each module's rank and the energy kept by the cut.",
    )
    parser.add_argument("adapters", nargs="+", help="adapter directories (PEFT format)")
    parser.add_argument(
        "--weights", nargs="+", type=float, help="one weight per adapter (default: 1 each)"
    )
    parser.add_argument("--method", choices=METHODS, default="cat", help="default: %(default)s")
    parser.add_argument(
        "--rank",
        type=int,
        help="rank per module for the SVD methods (default: the largest input rank)",
    )
    parser.add_argument(
        "--density",
        type=float,
        help="share of entries kept, in (0, 1] (ties, dare_*, magnitude_prune)",
    )
    parser.add_argument(
        "--majority-sign",
        choices=("total", "frequency"),
        help="TIES sign election (ties, dare_ties): sign of the sum, or of the sum of signs "
        "(default: total)",
    )
    parser.add_argument("--seed", type=int, help="DARE's seed (dare_linear, dare_ties; default: 0)")
    parser.add_argument("--output", required=True, help="directory for the combined adapter")
    add_overwrite_option(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


# combine()'s options as flags (which methods take them: combining.OPTION_METHODS).
_FLAGS = {"density": "--density", "majority_sign_method": "--majority-sign", "seed": "--seed"}


def _check(args: argparse.Namespace) -> None:
    """Refuse what the combination cannot do or would ignore, before any adapter is read."""
    from lorakit.combining.arguments import rank_for_cat, unused_option

    refuse_empty("combine: --output", args.output, "give a directory for the combined adapter")
    for adapter in args.adapters:
        refuse_empty("combine: an input adapter", adapter, "give each adapter's directory")
    refuse_output_onto_inputs(
        "combine", args.output, [("input adapter", adapter) for adapter in args.adapters]
    )
    check_adapter_output("combine", Path(args.output), args.overwrite)
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise UserError(
            f"combine: {len(args.adapters)} adapters but {len(args.weights)} --weights; give one "
            "weight per adapter, in the same order"
        )
    if args.rank is not None and args.method == "cat":
        raise UserError(f"combine: {rank_for_cat('--rank')}")
    given = {"density": args.density, "majority_sign_method": args.majority_sign, "seed": args.seed}
    unused = unused_option(args.method, given, _FLAGS)
    if unused is not None:
        raise UserError(f"combine: {unused[1]}")


def _print_report(result, directory) -> None:
    print(f"{'module':<52} {'rank':>5} {'energy kept':>12}")
    for report in result.modules:
        print(f"{report.name:<52} {report.rank:>5} {report.energy_kept:>12.4f}")
    lowest = min(report.energy_kept for report in result.modules)
    print(
        f"\nmethod {result.method}: {len(result.modules)} modules, lowest energy kept {lowest:.4f}"
    )
    print(f"saved: {directory}")


@contextmanager
def warnings_as_lines(spelling: Callable[[str], str] = str) -> Iterator[None]:
    """Inside, Python shows each warning as one ``lorakit: warning: MESSAGE`` line on stderr (as
    ``lorakit eval`` prints them), not as its report with the file, line and source of the call,
    and a message already shown is not shown again (one warned from two call sites, as
    ``lorakit train``'s ``inject`` of the meta model and then of the model). ``spelling``: the
    message as the command says it (its flags for the library's argument names). Only the text
    changes (``warnings.formatwarning``, which Python's default ``showwarning`` writes): the
    filters and where warnings go stay, so a caller recording them
    (``catch_warnings(record=True)``, ``pytest.warns``) still gets them all."""
    shown: set[str] = set()

    def one_line(message, category, filename, lineno, line=None) -> str:
        text = spelling(str(message))
        if text in shown:
            return ""
        shown.add(text)
        return f"lorakit: warning: {text}\n"

    original = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def run(args: argparse.Namespace) -> int:
    _check(args)
    from lorakit.combining import combine

    with warnings_as_lines():
        result = combine(
            args.adapters,
            args.weights,
            method=args.method,
            rank=args.rank,
            density=args.density,
            majority_sign_method=args.majority_sign,
            seed=args.seed,
        )
        with removed_if_left_empty(args.output):
            directory = result.save(args.output)
    if args.json:
        print(json.dumps({**result.to_dict(), "output": str(directory)}, indent=2))
    else:
        _print_report(result, directory)
    return 0
