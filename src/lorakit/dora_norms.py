"""DoRA's row norms ``n_i = ||W0_i + s (B A)_i||``, computed without a (d, k) copy of W0.

DoRA (``lorakit.functional``'s docstring has its formula) scales each output row by
``m / n``; ``n`` needs W0, which may be large and in a half dtype. These functions give it in
float32 (float64 if any input is), W0 cast block by block, from the expansion

    n_i^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T

with the rows where that sum cancels recomputed directly. A row whose norm is exactly 0 (W0 and
``s B A`` both zero there: a pruned or zero-padded row under a new adapter) leaves ``f = m / n``
undefined: ``dora_row_norms`` raises ``ZeroRowNormsError`` naming the rows (found among the
recomputed rows, at no extra cost), and so the creation of such an adapter is refused. ``lorakit.functional`` re-exports
``norm_dtype``, ``base_row_sq_norms`` and ``dora_row_norms``; the layers call them from there.
"""

from __future__ import annotations

import torch

__all__ = [
    "ZeroRowNormsError",
    "base_row_sq_norms",
    "dora_row_norms",
    "exact_row_norms",
    "norm_dtype",
    "weight_rows",
    "zero_rows",
]


NORM_CHUNK_ELEMENTS = 1 << 22  # rows of W0 cast to the norm dtype at a time: at most 4M values
CANCELLATION_GUARD = 1.0 / 16.0
"""A row's squared norm computed by the expansion is trusted when it is at least this fraction
of ``(||W0_i|| + s ||(B A)_i||)^2``; below, cancellation has cost more than 4 bits and the
row is computed directly (``exact_row_norms``)."""


class ZeroRowNormsError(ValueError):
    """``n_i = ||W0_i + s (B A)_i|| = 0`` on output rows ``rows``: ``f = m / n`` is undefined
    there (0 / 0 for a new adapter, whose ``m`` is ``n``), so every output through the layer
    would be NaN. ``shape``: the base weight's ``(d, k)``; ``adapter``: its name, when known."""

    def __init__(self, rows: list[int], shape: tuple[int, int], adapter: str | None = None):
        self.rows, self.shape, self.adapter = rows, shape, adapter
        who = "a DoRA adapter" if adapter is None else f"DoRA adapter {adapter!r}"
        super().__init__(
            f"{who}: the row norms n = ||W0 + s B A||_row are 0 on {len(rows)} of the "
            f"{shape[0]} output rows of this layer (base weight of {shape[0]} outputs x "
            f"{shape[1]} inputs; {rows_named(rows)}): W0 + s B A is all zero there (a pruned or "
            "zero-padded row of W0 under a new adapter), so f = m / n is undefined and every output "
            "through the layer would be NaN (PEFT computes NaN there). Leave this layer out of "
            "target_modules, or use plain LoRA (use_dora=False) for it."
        )


def rows_named(rows: list[int], first: int = 5) -> str:
    """``row 3`` / ``rows 3, 7, 9, 12, 15, ...`` (the first ``first`` indices)."""
    shown = ", ".join(str(row) for row in rows[:first])
    more = ", ..." if len(rows) > first else ""
    return f"row {shown}" if len(rows) == 1 else f"rows {shown}{more}"


def zero_rows(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Indices (int64, ascending) of the output rows of ``weight`` that are all zero: one
    pass over W0 ((d, k); (k, d) with ``fan_in_fan_out``), block by block, no copy of it."""
    rows = weight_rows(weight.detach(), fan_in_fan_out)
    nonzero = torch.empty(rows.shape[0], dtype=torch.bool, device=weight.device)
    step = max(1, NORM_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        nonzero[start : start + step] = rows[start : start + step].any(dim=1)
    return (~nonzero).nonzero().flatten()


def norm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype DoRA's row norms are computed in: float64 if any input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weight_rows(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``W0`` as (d, k) rows (a view; ``Conv1D`` stores it (k, d))."""
    return weight.T if fan_in_fan_out else weight


def _row_chunks(rows: torch.Tensor, dtype: torch.dtype):
    """``(slice, rows[slice] in dtype)`` over blocks of rows: no full-size copy of W0."""
    step = max(1, NORM_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        yield part, rows[part].to(dtype)


def base_row_sq_norms(
    weight: torch.Tensor, fan_in_fan_out: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``||W0_i||^2`` for each output row i, in ``dtype``: (d,). W0 (d, k), or (k, d) when
    ``fan_in_fan_out``; cast block by block (no (d, k) copy in ``dtype``)."""
    rows = weight_rows(weight.detach(), fan_in_fan_out)
    out = torch.empty(rows.shape[0], dtype=dtype, device=weight.device)
    for part, block in _row_chunks(rows, dtype):
        out[part] = (block * block).sum(dim=1)
    return out


def _weight_times_A(
    weight: torch.Tensor, lora_A: torch.Tensor, fan_in_fan_out: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``W0 A^T`` (d, r) in ``dtype``, W0 cast block by block."""
    rows = weight_rows(weight.detach(), fan_in_fan_out)
    A_t = lora_A.detach().to(dtype).T  # (k, r)
    out = torch.empty(rows.shape[0], A_t.shape[1], dtype=dtype, device=weight.device)
    for part, block in _row_chunks(rows, dtype):
        torch.mm(block, A_t, out=out[part])
    return out


def exact_row_norms(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||W0_i + s (B A)_i||`` computed directly, in ``norm_dtype``, for the output rows
    ``rows`` (an index tensor; all rows when None): (len(rows),). Builds (len(rows), k)."""
    dtype = norm_dtype(weight, lora_A, lora_B)
    chosen = weight_rows(weight.detach(), fan_in_fan_out)
    lora_B = lora_B.detach()
    if rows is not None:
        chosen, lora_B = chosen[rows], lora_B[rows]
    full = chosen.to(dtype) + scale * (lora_B.to(dtype) @ lora_A.detach().to(dtype))
    return torch.linalg.vector_norm(full, dim=1)


def dora_row_norms(
    base_sq_norms: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``n_i = ||W0_i + s (B A)_i||`` (d,) without forming the (d, k) matrix::

        n_i^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T

    ``base_sq_norms``: ``||W0_i||^2`` (``base_row_sq_norms``, computed once per weight). Cost:
    one (d, k) x (k, r) product plus O((d + k) r^2). In ``norm_dtype`` (float32 or float64),
    detached. Rows where the sum cancels (below ``CANCELLATION_GUARD`` of
    ``(||W0_i|| + s ||(B A)_i||)^2``, i.e. ``s B A`` nearly ``-W0`` on that row) are recomputed
    directly (``exact_row_norms``), so every row keeps the precision of the direct norm (while
    ``torch.compile`` traces, every row's direct norm is computed and taken where guarded: a
    traced graph cannot pick rows by value). ``ZeroRowNormsError`` where a norm is exactly 0
    (outside a traced graph).
    Shapes: W0 (d, k) ((k, d) with ``fan_in_fan_out``), A (r, k), B (d, r).
    """
    dtype = norm_dtype(weight, lora_A, lora_B)
    A, B = lora_A.detach().to(dtype), lora_B.detach().to(dtype)
    base_sq = base_sq_norms.to(dtype)
    cross = (B * _weight_times_A(weight, A, fan_in_fan_out, dtype)).sum(dim=1)  # (d,)
    lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1).clamp_min(0.0) * (scale * scale)  # (d,)
    squared = base_sq + (2.0 * scale) * cross + lora_sq
    norms = squared.clamp_min(0.0).sqrt()
    if squared.device.type == "meta":  # shapes only (e.g. ``lorakit plan``): nothing to guard
        return norms
    bound = (base_sq.sqrt() + lora_sq.sqrt()).pow(2)
    guarded = squared <= CANCELLATION_GUARD * bound  # a zero row too (bound 0): see below
    if torch.compiler.is_compiling():  # no data-dependent shapes in a traced graph
        exact = exact_row_norms(weight, A, B, scale, fan_in_fan_out)  # every row, (d,)
        return torch.where(guarded, exact, norms)
    cancelled = guarded.nonzero().flatten()
    if cancelled.numel():
        exact = exact_row_norms(weight, A, B, scale, fan_in_fan_out, cancelled)
        norms[cancelled] = exact
        zero = cancelled[exact == 0]  # n_i = 0: f = m / n undefined (no extra pass over W0)
        if zero.numel():
            raise ZeroRowNormsError(zero.tolist(), (B.shape[0], A.shape[1]))
    return norms
