"""Counting the work a call does, deterministically (unlike a timing, it ignores machine load)."""

from __future__ import annotations

import gc
import sys


def calls_made(function, *args, **kwargs) -> int:
    """How many Python and C function calls ``function(*args, **kwargs)`` makes."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    gc.collect()  # a collection inside the call would count its finalizers' calls too
    gc.disable()
    sys.setprofile(count)
    try:
        function(*args, **kwargs)
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls
