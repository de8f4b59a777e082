"""``TrainableTokens``: chosen rows of an embedding trained in full (PEFT's
``trainable_token_indices``).

Each adapter holds the NEW values of its rows, ``trainable_tokens_delta`` (n, dim), initialised
to the rows' current values (PEFT's name: they are values, not differences); the forward looks
tokens up in ``W0`` with those rows replaced (``lorakit.functional.replace_rows``). The file key
is PEFT's, ``<embedding>.token_adapter.trainable_tokens_delta``.

It is a ``ModulesToSave`` whose per-adapter "copy" is the small ``TokenRows`` module, so choosing,
freezing, deleting and unloading adapters work as for saved modules. Merging leaves the weight as
it is (the forward is already exact; merged or not, the outputs are the same) and notes the
merged adapters (``merged_adapters``; two whose rows share ids are refused, as in PEFT:
``refuse_shared_rows``), and ``merge_and_unload`` writes their rows into the embedding
(``merged_module``). Tied input/output embeddings are refused (``token_checks``): PEFT then
replaces the rows in the output layer too.

An embedding accelerate offloaded (``cpu_offload``, a ``device_map`` with "cpu" / "disk"
entries: ``W0`` on the meta device between calls, its value in the hook's ``weights_map``)
works as a plain one: the rows start as copies read from that map, on the hook's execution
device; the forward runs through the embedding's hooks, which load ``W0`` for the call; and
``merge_and_unload`` writes the embedding with its rows into the offload map
(``offloaded_merge``, as for a LoRA layer). Rows added BEFORE the model was offloaded are
offloaded with it (on the meta device): the first forward or merge loads them for good onto the
execution device (``ModulesToSave.load_offloaded_copies``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import functional
from lorakit.layers.base import offload_hook
from lorakit.layers.embedding import times_embed_scale
from lorakit.layers.per_call import current_override
from lorakit.layers.saved import ModulesToSave
from lorakit.layers.token_checks import check_embedding, keyed_targets, shared_rows

__all__ = [
    "DELTA_KEY",
    "TokenRows",
    "TrainableTokens",
    "forget_token_merges",
    "record_token_merges",
    "refuse_shared_rows",
    "token_targets",
]

DELTA_KEY = "token_adapter.trainable_tokens_delta"
"""The rows' key under the embedding's path, in the model and (without the adapter) in files."""


class TokenRows(nn.Module):
    """One adapter's rows: ``token_adapter.trainable_tokens_delta`` (n, dim) and their token
    ``indices`` (n,) (a buffer kept out of the state dict: the config holds them; also as the
    list ``token_ids``)."""

    def __init__(self, indices: Sequence[int], values: torch.Tensor) -> None:
        super().__init__()
        self.token_adapter = nn.Module()
        self.token_adapter.trainable_tokens_delta = nn.Parameter(values)
        index = torch.tensor(list(indices), dtype=torch.long, device=values.device)
        self.register_buffer("indices", index, persistent=False)
        self.token_ids = [int(i) for i in indices]  # (read without a device: offloaded, meta)

    @property
    def values(self) -> nn.Parameter:
        return self.token_adapter.trainable_tokens_delta


class TrainableTokens(ModulesToSave):
    """An ``nn.Embedding`` whose chosen rows each adapter trains (``TokenRows`` per adapter).

    ``weight``, ``num_embeddings``, ``embedding_dim`` and ``padding_idx`` are the embedding's
    (``weight`` is its Parameter ``W0``, WITHOUT the adapters' rows: ``weight_with_rows`` gives
    the table the forward uses; PEFT's wrapper returns that table as ``weight``), so code that
    reads ``get_input_embeddings().weight`` (its dtype, device, shape) works.
    ``model.resize_token_embeddings`` is refused by transformers (a ``TypeError``: not an
    ``nn.Embedding``), as with PEFT: resize the vocabulary before adding the adapter.

    ``merged_adapters``: the adapters ``lorakit.merge`` merged here (the weight is not
    changed: ``merge_and_unload`` writes their rows, ``unmerge`` forgets them); PEFT's front
    door makes a wrapper holding merged rows compute those alone, as its LoRA layers."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__(original_module)
        self.merged_adapters: list[str] = []

    @property
    def weight(self) -> nn.Parameter:
        """The embedding's weight ``W0`` (num_embeddings, dim), without the adapters' rows."""
        return self.original_module.weight

    @property
    def num_embeddings(self) -> int:
        return self.original_module.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.original_module.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.original_module.padding_idx

    def add_tokens(
        self, adapter_name: str, indices: Sequence[int], init: bool | str | None
    ) -> None:
        """Rows for ``adapter_name``: copies of the embedding's current rows ``W0[indices]``
        (n, dim) whatever the LoRA init (``init`` True, False or a string), or uninitialised
        (None: about to be loaded). PEFT starts them the same way for a ``LoraConfig``: its
        ``TrainableTokensWrapper`` gets no ``init_weights``, so ``init_lora_weights=False``
        leaves the rows as copies (standard-normal rows are only for PEFT's standalone
        ``TrainableTokensConfig(init_weights=False)``, which lorakit does not implement).
        Trainable, on the weight's device, in the adapter dtype
        (``layer_wrapping.default_adapter_dtype``: float32 beside a 16-bit embedding, as PEFT keeps
        them, so small updates are not lost to its rounding)."""
        from lorakit.layer_wrapping import default_adapter_dtype

        weight = self.original_module.weight
        dtype = default_adapter_dtype(weight.dtype)
        hook = self.offloading_hook()  # (then W0 is read from its map, once)
        device = weight.device if hook is None else torch.device(hook.execution_device)
        if init is None:
            values = torch.empty(len(indices), weight.shape[1], dtype=dtype, device=device)
        else:
            table = weight if hook is None else hook.weights_map["weight"]
            rows = table.detach()[list(indices)].to(weight.dtype)  # (as the hook loads W0)
            values = rows.to(device=device, dtype=dtype, copy=True)
        self.modules_to_save[adapter_name] = TokenRows(indices, values)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.merged_adapters = [n for n in self.merged_adapters if n != adapter_name]

    def rows_to_merge(self, adapter_names: Sequence[str]) -> dict[str, list[int]]:
        """``{adapter: token ids}`` that merging ``adapter_names`` here leaves in the weight:
        the adapters merged before, then the named ones, each once (PEFT's order)."""
        names = dict.fromkeys([*self.merged_adapters, *adapter_names])
        return {n: self.modules_to_save[n].token_ids for n in names if n in self.modules_to_save}

    def record_merge(self, adapter_names: Sequence[str]) -> None:
        """Note ``adapter_names`` (those with rows here) as merged (``merged_adapters``)."""
        self.merged_adapters = list(self.rows_to_merge(adapter_names))

    def offloading_hook(self):
        """The accelerate hook that offloads the embedding (``layers.base.offload_hook``) while
        its weight is on the meta device (between calls), else None. Its execution device is
        where the rows live."""
        base = self.original_module
        hook = offload_hook(base)
        usable = hook is not None and hook.execution_device is not None
        return hook if usable and base.weight.is_meta else None

    def chosen_rows(self) -> list[TokenRows]:
        """The rows of the adapters this call uses (``use_adapters`` / ``disabled`` or else the
        active ones), in order: a later adapter's row wins where two set the same token."""
        override = current_override(self)
        chosen = self.active_adapters if override is None else override
        return [self.modules_to_save[n] for n in chosen if n in self.modules_to_save]

    def weight_with_rows(self, rows: Sequence[TokenRows]) -> torch.Tensor:
        """``W0`` with each adapter's rows in place (autograd reaches the rows only)."""
        weight = self.original_module.weight
        for adapter in rows:
            weight = functional.replace_rows(weight, adapter.indices, adapter.values)
        return weight

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``E[ids]`` with ``E = W0`` with the chosen adapters' rows; shapes (...,) -> (..., dim)."""
        self.load_offloaded_copies()  # (rows offloaded with the model)
        rows = self.chosen_rows()
        base = self.original_module
        if not rows or args or kwargs:
            return base(ids, *args, **kwargs)
        if self.offloading_hook() is None:
            return self.embedding_with_rows(ids, rows)
        hooks = base._hf_hook  # all of them, as accelerate's forward wrapper runs them
        (ids,), _ = hooks.pre_forward(base, ids)  # W0 loaded, ids on the execution device
        try:
            out = self.embedding_with_rows(ids, rows)
        except BaseException:
            hooks.post_forward(base, None)  # offloaded again, as after a call
            raise
        return hooks.post_forward(base, out)

    def embedding_with_rows(self, ids: torch.Tensor, rows: Sequence[TokenRows]) -> torch.Tensor:
        """``E[ids]`` with ``E = W0`` with ``rows`` in place, as the embedding computes it
        (its padding index, max norm, scaled gradients; times its ``embed_scale``)."""
        base = self.original_module
        out = F.embedding(
            ids,
            self.weight_with_rows(rows),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return times_embed_scale(base, out)  # e.g. Gemma's and BART's scaled embeddings

    def merged_module(self, adapter_names: Sequence[str]) -> nn.Module:
        """The embedding holding the rows of the adapters merged before (``merged_adapters``)
        and of the named ones for good (``merge_and_unload``; ``refuse_shared_rows`` checked
        they are disjoint): a new weight Parameter, so a tensor shared with another module is
        never changed (an offloaded one's written into its hook's offload map,
        ``offloaded_merge.offload_merged``)."""
        self.load_offloaded_copies()  # (rows offloaded with the model)
        rows = [self.modules_to_save[n] for n in self.rows_to_merge(adapter_names)]
        base = self.original_module
        hook = self.offloading_hook() if rows else None
        if hook is None:
            if rows:
                self._install_rows(rows)
            return base
        from lorakit.offloaded_merge import offload_merged, onloaded

        with onloaded([(base, hook)]):  # W0 loaded; offloaded again if this raises
            self._install_rows(rows)
        offload_merged([(base, hook)])  # each later call loads the embedding with its rows
        return base

    def _install_rows(self, rows: Sequence[TokenRows]) -> None:
        """The embedding's weight: a new Parameter of ``W0`` with ``rows`` in place."""
        with torch.no_grad():
            weight = self.weight_with_rows(rows).detach().clone()
        self.original_module.weight = nn.Parameter(weight)


def token_targets(model: nn.Module, indices, modules: dict[str, nn.Module]) -> dict[str, list[int]]:
    """``{embedding name: token indices}`` for ``LoraConfig.trainable_token_indices``: a list is
    for the input embedding (``get_input_embeddings``); a dict maps names to indices, a key
    naming each module whose name is the key or ends with ``"." + key`` (PEFT's rule,
    ``token_checks.keyed_targets``). ``modules``: the ORIGINAL modules by name. Raises
    ValueError naming what cannot be done (``token_checks.check_embedding``); warns
    (``UnusedTargetWarning``) for an embedding the forward never calls (BART's ``shared``)."""
    if indices is None:
        return {}
    if isinstance(indices, dict):
        found = keyed_targets(model, indices, modules)
    else:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, ModulesToSave):  # rows of another adapter are there already
            embedding = embedding.original_module
        found = {n: list(indices) for n, m in modules.items() if m is embedding}
        if not found:
            raise ValueError(
                f"trainable_token_indices is a list, but this {type(model).__name__} has no "
                "input embedding (get_input_embeddings); give {embedding name: token ids}."
            )
    for name, wanted in found.items():
        check_embedding(model, name, modules[name], wanted)
    from lorakit.uncalled_embeddings import warn_uncalled_token_embeddings  # (imports layers)

    warn_uncalled_token_embeddings(model, list(found))
    return found


def _token_wrappers(modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, TrainableTokens]]:
    return [(name, module) for name, module in modules if isinstance(module, TrainableTokens)]


def refuse_shared_rows(
    modules: Iterable[tuple[str, nn.Module]], adapter_names: Sequence[str], what: str
) -> None:
    """``ValueError`` (before any change) when merging ``adapter_names`` (``what``: the
    caller's name) would write two adapters' rows of one token into an embedding
    (``modules``: ``state.saved_modules(model)``), adapters merged earlier included: the merged
    table would depend on the order. PEFT refuses it too (``_check_overlapping_tokens``)."""
    for name, wrapper in _token_wrappers(modules):
        clash = shared_rows(wrapper.rows_to_merge(adapter_names))
        if clash is not None:
            adapter, others, ids = clash
            raise ValueError(
                f"{what}: adapter {adapter!r} trains rows {ids} of embedding {name!r} "
                f"(trainable_token_indices), which adapter(s) {others} also train; merging "
                "both would keep one adapter's row of each such token, chosen by the order. "
                "Merge one of them (as PEFT, which refuses this too). Nothing was changed."
            )


def record_token_merges(modules: Iterable[tuple[str, nn.Module]], adapter_names) -> None:
    """Each trainable-token wrapper in ``modules`` notes ``adapter_names`` as merged
    (``TrainableTokens.merged_adapters``; its weight does not change)."""
    for _, wrapper in _token_wrappers(modules):
        wrapper.record_merge(adapter_names)


def forget_token_merges(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """``unmerge``: no trainable-token wrapper in ``modules`` holds merged rows any more."""
    for _, wrapper in _token_wrappers(modules):
        wrapper.merged_adapters.clear()
