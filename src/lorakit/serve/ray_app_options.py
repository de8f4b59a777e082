"""The arguments of the Ray Serve application (``ray_deployment.build_app``) checked, and the
settings its deployments take from the ``lorakit serve`` options every replica parses: the
counts (``replicas``, ``adapters_per_replica``: ints >= 1), the options as a list of strings
parsed by ``lorakit serve``'s own parser, the largest request body the replicas' app takes (the
ingress's limit), and the requests in flight to one replica (one more than its engine takes at
once, so that a full replica answers with its own 429).

Ray is not imported here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lorakit.serve.replica_bank import BankTooSmallError

__all__ = [
    "argument_list",
    "check_counts",
    "max_body_bytes",
    "requests_per_replica",
    "serve_options",
]


def check_counts(replicas: object, adapters_per_replica: object) -> None:
    """Both ints (not bools: ``True`` is no count) and >= 1. A string such as ``"2"`` for
    ``replicas`` was multiplied into the ingress's ``max_ongoing_requests`` (a 161-character
    string), and Ray's own message for 0 names neither this argument nor what it is."""
    for name, value in (("replicas", replicas), ("adapters_per_replica", adapters_per_replica)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if replicas < 1:
        raise ValueError(
            f"replicas must be >= 1, got {replicas}: the copies of LorakitReplica, each a "
            "whole lorakit server"
        )
    if adapters_per_replica < 1:
        raise BankTooSmallError(
            f"adapters_per_replica must be >= 1, got {adapters_per_replica}: a replica pins "
            "every adapter of its multiplexed cache in a bank of fixed size, so Ray's -1 (no "
            "limit) would fill it for good"
        )


def max_body_bytes(options: argparse.Namespace) -> int:
    """The largest request body the replicas' app takes (its ``ServerSettings``, as
    ``lorakit serve`` makes them from ``options``; the limit does not depend on the model's
    positions or the admin token, which are not read here)."""
    from lorakit.commands.serve import server_settings

    return server_settings(options, positions=2, token=None).max_body_bytes


def argument_list(serve_args: Sequence[str] | None) -> list[str]:
    """``serve_args`` as a new list; ``TypeError`` for anything but a list or tuple of strings
    (an ``argparse.Namespace`` cannot be turned back into the options a replica parses)."""
    if serve_args is None:
        return []
    if not isinstance(serve_args, list | tuple) or not all(
        isinstance(arg, str) for arg in serve_args
    ):
        raise TypeError(
            f"build_app: serve_args must be the options of 'lorakit serve' as a list of "
            f"strings, e.g. ['--model', MODEL, '--adapters', DIR], not "
            f"{type(serve_args).__name__}; pass the command line itself, not its parsed result"
        )
    return list(serve_args)


def serve_options(serve_args: list[str]) -> argparse.Namespace:
    """``serve_args`` parsed by ``lorakit serve``'s own parser (as every replica parses them,
    so an abbreviation such as ``--max-adapt 40`` reads as it does there)."""
    from lorakit.cli import build_parser

    return build_parser().parse_args(["serve", *serve_args])


def requests_per_replica(options: argparse.Namespace) -> int:
    """Requests in flight to one replica: one more than its engine takes at once
    (``--max-batch`` running plus ``--max-waiting`` queued), so that a full replica answers the
    extra request with its own 429 and ``Retry-After`` instead of Ray queueing it. Ray Serve's
    own default of 5 per replica capped the batch, and the ingress's the whole cluster, at 5."""
    return options.max_batch + options.max_waiting + 1
