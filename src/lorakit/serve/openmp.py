"""Keep the engine thread's OpenMP team fast: release the starting thread's idle team.

torch's CPU ops run their parallel regions on OpenMP (libgomp with Linux wheels), and every
thread that runs them gets a team of worker threads of its own. The engine computes on its own
thread, while the thread that loaded the model (usually the main thread) keeps an idle team.
Counting both, libgomp sees more OpenMP threads than cores and throttles its spin-waiting, so the
engine's team sleeps and wakes at each of a decode step's ~300 small parallel regions (our
reading; the measurements fit it). Measured
on a 2-core machine at 2 torch threads (SmolLM2-135M, int4-groups base, one stream, 40 steps):
40.3 ms a step on the engine thread, 21.5 ms after the loading thread released its team (22.3 ms
on the main thread itself).

``release_idle_team()`` frees the calling thread's team with OpenMP 5.0's
``omp_pause_resource_all(omp_pause_soft)``; the runtime makes a new one if that thread runs
parallel regions again. Without an OpenMP runtime that has the call it does nothing; it never
raises (it only saves time).
"""

from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["release_idle_team", "runtime_paths"]

OMP_PAUSE_SOFT = 1
RUNTIMES = ("libgomp", "libiomp5", "libomp")


def runtime_paths(maps_lines, torch_dir: str) -> list[str]:
    """The OpenMP runtimes among the files mapped in ``maps_lines`` (``/proc/PID/maps``:
    ``address perms offset dev inode path``, the path possibly holding spaces), torch's own
    (under ``torch_dir``) first: another library's runtime (e.g. one bundled with scikit-learn)
    has other teams."""
    paths = set()
    for line in maps_lines:
        fields = line.rstrip("\n").split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(RUNTIMES):
            paths.add(fields[5])
    inside = os.path.join(os.path.realpath(torch_dir), "")
    return sorted(paths, key=lambda path: (not os.path.realpath(path).startswith(inside), path))


@functools.cache
def _pause_all():
    """``omp_pause_resource_all`` of torch's OpenMP runtime in this process, or None."""
    import torch

    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = runtime_paths(maps, os.path.dirname(torch.__file__))
    except OSError:  # not Linux: nothing to release
        return None
    for path in paths:
        try:
            function = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
        except OSError:  # e.g. mapped but deleted since: try the next
            continue
        if function is not None:
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            return function
    return None


def release_idle_team() -> bool:
    """Free the calling thread's idle OpenMP team; True when the runtime did."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
