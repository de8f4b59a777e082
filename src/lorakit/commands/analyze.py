"""``lorakit analyze``: how low is the rank of an update? Singular values and effective ranks.

lorakit analyze ADAPTER_DIR [--json] [--plots DIR] [--energy 0.9]
lorakit analyze --base DIR --finetuned DIR [--json] [--plots DIR]
"""

from __future__ import annotations

import argparse
import json
import os

from lorakit.errors import UserError

# The files ``--plots DIR`` writes: the spectra, then the effective ranks.
PLOT_NAMES = ("spectra.png", "ranks.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="spectrum and effective rank of an adapter's or a fine-tune's weight update",
        description="Per-layer singular values of ΔW (s·B·A of an adapter, from its factors; or "
        "W_ft - W0 of a full fine-tune), effective rank at 90/99% energy, entropy effective rank, "
        "stable rank, and the rank advised per module type.",
    )
    parser.add_argument("adapter", nargs="?", help="a PEFT-format adapter directory")
    parser.add_argument("--base", help="base model directory (with --finetuned)")
    parser.add_argument("--finetuned", help="fully fine-tuned model directory (with --base)")
    parser.add_argument("--task", choices=["causal-lm", "seq-cls"], help="model class to load")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON; it lists each layer's first 64 singular values "
        "(singular_value_count and singular_values_truncated say how many there are; the ranks "
        "and norms use all)",
    )
    parser.add_argument(
        "--plots",
        metavar="DIR",
        help="write spectra.png and ranks.png here (refused if either is already there)",
    )
    parser.add_argument(
        "--energy", type=float, default=0.9, help="energy share for the rank advice (0.9)"
    )
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    from_models = args.base is not None or args.finetuned is not None
    if from_models and (args.base is None or args.finetuned is None):
        raise UserError("analyze: give both --base and --finetuned (two model directories)")
    if from_models == (args.adapter is not None):
        raise UserError("analyze: give either an ADAPTER_DIR or --base DIR --finetuned DIR")
    if not 0.0 < args.energy <= 1.0:
        raise UserError(f"analyze: --energy must be in (0, 1], got {args.energy}")
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        raise UserError(f"analyze: --plots {args.plots} is a file; give a directory")
    for name in PLOT_NAMES if args.plots else ():
        if os.path.lexists(os.path.join(args.plots, name)):
            raise UserError(
                f"analyze: --plots {args.plots} already holds {name}; give another --plots "
                "directory or remove it"
            )


def run(args: argparse.Namespace) -> int:
    _check(args)
    from lorakit.analysis.report import (
        format_left_out,
        format_table,
        rank_advice,
        share_label,
        spectra_report,
    )
    from lorakit.analysis.sources import adapter_dir_spectra, model_dirs_update

    left_out = []  # what has no W_ft - W0 (a resized head, a block only one model has)
    if args.adapter is not None:
        spectra = adapter_dir_spectra(args.adapter)
    else:
        spectra, left_out = model_dirs_update(args.base, args.finetuned, args.task, progress=False)
    shares = sorted({0.9, 0.99, args.energy})
    if args.json:
        report = spectra_report(spectra, shares=shares, left_out=left_out)
        print(json.dumps(report, indent=2))
    else:
        print(format_table(spectra))
        advice = ", ".join(
            f"{a.module_type}: r={a.rank}" for a in rank_advice(spectra, args.energy)
        )
        print(f"\nadvised rank at {share_label(args.energy)} of the energy: {advice}")
        if left_out:
            print("\n" + format_left_out(left_out))
    if args.plots:
        from lorakit.analysis.plots import plot_effective_ranks, plot_spectra

        spectra_png, ranks_png = (os.path.join(args.plots, name) for name in PLOT_NAMES)
        written = [
            plot_spectra(spectra, spectra_png),
            plot_effective_ranks(spectra, ranks_png),
        ]
        if not args.json:
            print("plots: " + ", ".join(str(path) for path in written))
    return 0
