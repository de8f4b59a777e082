"""How lorakit writes sizes: file and memory sizes in binary (IEC) units, 1 KiB = 1024 bytes,
1 MiB = 1024 KiB, 1 GiB = 1024 MiB (``lorakit plan``'s memory model alone counts in decimal
GB = 10^9 bytes, and says so)."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in the largest binary unit below it: ``512 B``, ``46.5 KiB``, ``18.8 MiB``,
    ``1.3 GiB`` (one decimal; whole bytes below 1 KiB)."""
    size = float(n_bytes)
    for unit, decimals in (("B", 0), ("KiB", 1), ("MiB", 1)):
        if abs(round(size, decimals)) < 1024:  # (1,048,575 B is 1.0 MiB, not 1024.0 KiB)
            return f"{size:.{decimals}f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
