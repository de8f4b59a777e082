"""Per-call choices that change what LoRA layers compute without touching any module: which
adapters (``adapter_override``, behind ``lorakit.use_adapters`` / ``lorakit.disabled``) and
per-row adapter routing for batched serving (``row_router``).

A choice holds inside its ``with`` block and only for the calling thread / asyncio task (a
context variable). ``torch.compile`` cannot read a context variable inside a graph, so each
choice is mirrored in a per-thread record that dynamo reads and guards on: a compiled model
recompiles for a new choice (or reuses the graph already compiled for it) instead of silently
keeping the adapters it was traced with. Inside a compiled model the choice is therefore per
thread, like ``torch.no_grad``. Where that record cannot tell (a block opened while an asyncio
event loop runs on the thread: another task may run while it is open, with or without a block of
its own; a notebook cell runs inside such a loop), compiled code reads the context variable
outside the graph (a graph break: correct, slower). An asyncio task that inherited a choice from its parent's block and runs
a compiled model after that block has ended sees the thread's choice; give such tasks their own
``use_adapters`` block.

Gradient checkpointing recomputes a segment's forward during ``backward``, which may run after
the block has ended: ``ChoiceKeepingCheckpoint`` wraps a checkpoint function so that the
recompute runs under the choices of the original forward.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.layers.base import LoraLayer

__all__ = [
    "ChoiceKeepingCheckpoint",
    "Router",
    "adapter_override",
    "current_override",
    "current_router",
    "row_router",
]

Value = TypeVar("Value")
_UNKNOWN = object()  # the thread's blocks come from several tasks: read the context variable


@torch._dynamo.disable
def _read_context(variable: contextvars.ContextVar):
    """``variable.get()`` outside any compiled graph (dynamo cannot trace it)."""
    return variable.get()


def _in_event_loop() -> bool:
    """True when an asyncio event loop runs on this thread: a block opened by one task may be
    open while another task runs (an ``await`` inside it), so the per-thread record cannot
    tell whose choice it holds."""
    asyncio = sys.modules.get("asyncio")  # (not imported: no loop)
    return asyncio is not None and asyncio._get_running_loop() is not None


class PerCallChoice(Generic[Value]):
    """A value chosen for the calls inside a ``with chosen(value):`` block; ``get()`` reads it in
    eager code (from the context) and inside ``torch.compile`` (from a guarded per-thread copy)."""

    def __init__(self, name: str, default: Value) -> None:
        self._default = default
        self._context: contextvars.ContextVar = contextvars.ContextVar(name, default=default)
        self._thread = threading.local()  # .value: what compiled code reads; .depth: open blocks

    def get(self) -> Value:
        if not torch.compiler.is_compiling():
            return self._context.get()
        mirrored = getattr(self._thread, "value", self._default)  # guarded by dynamo
        return _read_context(self._context) if mirrored is _UNKNOWN else mirrored

    @contextmanager
    def chosen(self, value: Value) -> Iterator[None]:
        previous = self._context.get()
        token = self._context.set(value)
        thread = self._thread
        in_step = getattr(thread, "value", self._default) is previous
        thread.value = value if in_step and not _in_event_loop() else _UNKNOWN
        thread.depth = getattr(thread, "depth", 0) + 1
        try:
            yield
        finally:
            self._context.reset(token)
            thread.depth -= 1
            if thread.depth == 0:
                thread.value = self._default
            else:
                thread.value = previous if thread.value is value else _UNKNOWN


# id(layer) -> exactly these adapters (() = none), for the layers of the models chosen. A layer
# not in the mapping (another model) uses its own ``active_adapters``.
_OVERRIDE: PerCallChoice[Mapping[int, tuple[str, ...]]] = PerCallChoice(
    "lorakit_adapter_override", types.MappingProxyType({})
)

# Per-row adapter routing for batched multi-adapter serving (``lorakit.serve``): when set, every
# LoRA layer calls ``router(layer, x, base_output)`` and returns its result.
Router = Callable[["LoraLayer", torch.Tensor, torch.Tensor], torch.Tensor]
_ROUTER: PerCallChoice[Router | None] = PerCallChoice("lorakit_row_router", None)


def current_router() -> Router | None:
    """The per-row router installed by ``row_router`` for the current call, or None."""
    return _ROUTER.get()


@contextmanager
def row_router(router: Router) -> Iterator[None]:
    """Within the block every LoRA layer returns ``router(layer, x, base_layer(x))``: the router
    adds each row's own adapter output (see ``lorakit.serve``). Only this thread / task sees it."""
    with _ROUTER.chosen(router):
        yield


def current_override(layer: nn.Module) -> tuple[str, ...] | None:
    """The adapters chosen for ``layer`` in the current call by ``adapter_override``, or None."""
    return _OVERRIDE.get().get(id(layer))


@contextmanager
def adapter_override(layers: Iterable[nn.Module], adapter_names: Sequence[str]) -> Iterator[None]:
    """Run forwards inside the block with exactly ``adapter_names`` active (``[]``: none) in
    ``layers`` (LoRA layers and saved-module wrappers; other layers keep their own choice).

    Only the calling thread / task sees the change; modules and weights are not modified.
    """
    names = tuple(adapter_names)
    chosen = {**_OVERRIDE.get(), **{id(layer): names for layer in layers}}
    with _OVERRIDE.chosen(chosen):
        yield


class ChoiceKeepingCheckpoint:
    """``checkpoint(function, *args, **kwargs)`` (e.g. ``torch.utils.checkpoint.checkpoint``,
    transformers' ``_gradient_checkpointing_func``) whose ``function`` runs under the adapter
    choices (``adapter_override``, ``row_router``) current when the segment is first run, also
    when backward recomputes it after the ``with`` block has ended (reentrant or not)."""

    def __init__(self, checkpoint: Callable) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable, *args, **kwargs):
        override, router = _OVERRIDE.get(), _ROUTER.get()
        if not override and router is None:  # no choice in effect: nothing to carry
            return self.checkpoint(function, *args, **kwargs)

        def under_choices(*inner_args, **inner_kwargs):
            with _OVERRIDE.chosen(override), _ROUTER.chosen(router):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint(under_choices, *args, **kwargs)
