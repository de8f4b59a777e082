"""PEFT's mixed batches: ``model(ids, adapter_names=[one name per row])``, each row with its own
adapter (``"__base__"``: none), by the per-row routing of ``lorakit.serve`` (``row_router`` with
the serving bank's ``BankRouter``) over a bank holding copies of the named adapters.
``PeftModel.forward`` / ``generate`` / ``rows_routed`` use it. Each call builds its bank (a copy
of the named adapters): the cost of a call is that of the routed forward plus that copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.adapter_choice import disabled
from lorakit.errors import AdapterNamesError
from lorakit.state import adapter_configs, lora_layers

__all__ = ["batch_size", "rows_routed", "sequences_per_row"]

_BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward / generate call, if known: the first dimension of its
    inputs, ``input_ids=``, ``inputs=`` (the name of ``generate``'s first parameter), the first
    positional argument, else ``inputs_embeds=`` (a tensor of 2 dimensions or more)."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    return inputs.shape[0] if torch.is_tensor(inputs) and inputs.dim() >= 2 else None


def sequences_per_row(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """How many sequences transformers' ``generate`` runs for each row of its input:
    ``max(num_beams, num_return_sequences)`` (the ``expand_size`` its
    ``_expand_inputs_for_generation`` repeats each row by), each from ``generate``'s keyword
    arguments, else its generation config (``generation_config=`` or its second positional
    argument, ``generate(inputs, generation_config, ...)``), else the model's."""
    given = kwargs.get("generation_config")
    if given is None and len(args) > 1:
        given = args[1]
    config = given or getattr(model, "generation_config", None)
    counts = [
        kwargs.get(k, getattr(config, k, None)) for k in ("num_beams", "num_return_sequences")
    ]
    return max([1, *(int(count) for count in counts if count)])


def _bank_of(model: nn.Module, names: list[str]):
    """A serving bank (``lorakit.serve.AdapterBank``) holding copies of adapters ``names`` of
    ``model``; ``AdapterNamesError`` (a ValueError, as PEFT's, and a TypeError) where the bank
    would not add what the model's own layers add."""
    from lorakit.serve.routing import bank_of_copies, what_a_bank_leaves_out

    for name in names:
        reasons = what_a_bank_leaves_out(model, name)
        if reasons:
            raise AdapterNamesError(
                f"adapter_names: adapter {name!r} cannot be routed per row (it has "
                f"{', '.join(reasons)}; lorakit's per-row routing, the serving bank of "
                "lorakit.serve, takes LoRA/DoRA adapters on linear layers only). Run each "
                "adapter's rows in a call of their own: with lorakit.use_adapters(model, [name]): "
                "model(rows)."
            )
    return bank_of_copies(model, names)


class _RowRouter:
    """The ``row_router`` callable for one adapter slot per batch row (-1: none): the serving
    bank's ``BankRouter``, whose row groups give every token of row ``i`` the row's slot. The
    groups are made for the shape of a layer's input (a prompt, then one token per decode step;
    the ``sequences_per_row`` sequences of a row, ``generate``'s beams, follow it), and kept
    while it does not change."""

    def __init__(self, bank, row_slots: list[int], sequences_per_row: int = 1) -> None:
        self.bank = bank
        self.row_slots = torch.tensor(row_slots)
        self.sequences_per_row = sequences_per_row
        self.shape: tuple[int, ...] | None = None
        self.router = None

    def __call__(self, layer: nn.Module, x: torch.Tensor, base_output: torch.Tensor):
        from lorakit.serve.batched import BankRouter, group_rows

        if tuple(x.shape[:-1]) != self.shape:
            slots = self.row_slots.repeat_interleave(self._tokens_per_row(x))  # row-major
            self.router = BankRouter(self.bank, group_rows(slots, self.bank.page_table))
            self.shape = tuple(x.shape[:-1])
        return self.router(layer, x, base_output)

    def _tokens_per_row(self, x: torch.Tensor) -> int:
        """The tokens of each named row in a layer's input ``x`` (..., features). A
        ``(batch, tokens, features)`` input must have as many rows as there are names (or
        ``sequences_per_row`` times as many: ``generate``'s beams / returned sequences, an
        encoder-decoder's encoder seeing the unexpanded rows), else ``ValueError``: the names
        would be laid over the wrong rows. A flattened ``(tokens, features)`` input shows no
        rows: it must hold a whole number of tokens per name."""
        names = len(self.row_slots)
        if x.dim() >= 3 and x.shape[0] not in (names, names * self.sequences_per_row):
            per_row = f" ({self.sequences_per_row} sequences per row: beams / returned sequences)"
            raise ValueError(
                f"adapter_names names {names} rows, but a layer got a batch of {x.shape[0]} "
                f"rows{per_row if self.sequences_per_row > 1 else ''}: give one adapter name "
                "per row of the batch. A model whose layers see several rows per input row "
                "(multiple choice, several images per prompt) cannot be routed per row, as in "
                "PEFT: run each adapter's rows in a call of their own (with "
                "lorakit.use_adapters(model, [name]): model(rows))."
            )
        per_row, rest = divmod(x.shape[:-1].numel(), names)
        if rest or not per_row:
            raise ValueError(
                f"adapter_names names {names} rows, but a layer got {x.shape[:-1].numel()} "
                "tokens (not a whole number per row); give one adapter name per row."
            )
        return per_row


@contextmanager
def rows_routed(
    model: nn.Module,
    adapter_names: Sequence[str],
    batch: int | None = None,
    sequences_per_row: int = 1,
) -> Iterator[None]:
    """Within the block (inference only: no gradient, model in eval mode, nothing merged)
    row ``i`` of every forward adds adapter ``adapter_names[i]`` alone (``"__base__"``:
    none): the per-row routing of ``lorakit.serve`` (``lorakit.layers.row_router`` with
    the serving bank's ``BankRouter``), from a bank holding copies of the named adapters.

    It covers plain LoRA and DoRA adapters on linear layers (what the bank holds); any
    other named adapter (an embedding or bare-parameter target, ``lora_bias``,
    ``modules_to_save``, trainable tokens, replicated layers) is refused with
    ``lorakit.errors.AdapterNamesError`` (a ValueError, as PEFT raises, and a TypeError): run
    each adapter's rows in their own call, ``with lorakit.use_adapters(model, [name])``.

    ``batch``: the rows of the call, where known (a different number of names is refused
    before it runs). Each layer checks the rows it gets: ``len(adapter_names)`` rows, or
    ``sequences_per_row`` times as many (``generate``'s beams or returned sequences; see
    ``sequences_per_row``), else a ``ValueError``.
    """
    names = _checked_row_names(model, adapter_names, batch)
    used = list(dict.fromkeys(name for name in names if name != _BASE))
    if not used:  # every row on the base model
        with torch.no_grad(), disabled(model):
            yield
        return
    from lorakit.layers import row_router

    bank = _bank_of(model, used)
    slots = [-1 if name == _BASE else bank.slot_of(name) for name in names]
    router = _RowRouter(bank, slots, sequences_per_row)
    with torch.no_grad(), disabled(model), row_router(router):
        yield


def _checked_row_names(
    model: nn.Module, adapter_names: Sequence[str], batch: int | None
) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise AdapterNamesError(
            f"adapter_names takes one adapter name per row of the batch (a list of str), got "
            f"{adapter_names!r}"
        )
    names = list(adapter_names)
    known = adapter_configs(model)
    unknown = sorted({name for name in names if name != _BASE and name not in known})
    if unknown:
        raise ValueError(
            f"adapter_names: unknown adapter(s) {unknown}; this model has {list(known)} "
            f"(and {_BASE!r}: no adapter)"
        )
    if batch is not None and len(names) != batch:
        raise ValueError(
            f"adapter_names needs one adapter name per row: got {len(names)} names for a "
            f"batch of {batch} rows"
        )
    if model.training:
        raise ValueError(
            "Cannot pass `adapter_names` when the model is in training mode (as in PEFT): "
            "call model.eval() first."
        )
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError(
            "Cannot pass `adapter_names` while adapters are merged (as in PEFT): call "
            "unmerge_adapter() first."
        )
    return names
