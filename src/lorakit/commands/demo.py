"""``lorakit demo``: fine-tune SmolLM2-135M-Instruct on movie-review sentiment and report."""

from __future__ import annotations

import argparse

from lorakit.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: LoRA-teach SmolLM2 movie-review sentiment, before/after accuracy",
        description=(
            "Load SmolLM2-135M-Instruct (packaged, offline), measure zero-shot accuracy on "
            "held-out Rotten Tomatoes test reviews, fine-tune a LoRA adapter (r=16, all seven "
            "projections) on the training split, measure again, save the adapter, merge it and "
            "check the merged model agrees, write loss_curve.png and summary.json/.txt."
        ),
    )
    parser.add_argument(
        "--output", default="lorakit-demo", help="output dir (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=80, help="optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="reviews per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-size", type=int, default=200, help="held-out test reviews (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length", type=int, default=96, help="max tokens per example (default: %(default)s)"
    )
    parser.add_argument(
        "--style",
        choices=["plain", "chat"],
        default="plain",
        help="prompt form: plain 'Review: ...\\nSentiment:' or the chat template (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "eval_size", "max_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    from lorakit.demo import DemoSettings, run_demo

    settings = DemoSettings(
        output=args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_size=args.eval_size,
        max_length=args.max_length,
        style=args.style,
        seed=args.seed,
        progress=not args.no_progress,
    )
    run_demo(settings)
    return 0
