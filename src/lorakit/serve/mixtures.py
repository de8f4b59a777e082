"""Per-request adapter mixtures: a request names adapters, weights and a method, and is served
with their combination (``lorakit.combine``), as LoRAX's ``merged_adapters``.

The request body (``/v1/completions`` or ``/v1/chat/completions``) carries, with ``model`` = the
base model's name::

    "merged_adapters": {
        "ids": ["style", "task"],          # served adapters (names as in GET /v1/models)
        "weights": [0.7, 0.3],             # default 1 each
        "merge_strategy": "dare_ties",     # lorakit.combine's method (default "cat"; "linear"
                                           #   is "cat")
        "rank": 8, "density": 0.5,         # as combine(): rank for the SVD methods (all but
        "majority_sign_method": "total",   #   cat), density for ties / dare_* /
        "seed": 0                          #   magnitude_prune, TIES' sign rule, DARE's seed
    }

An option given to a method that does not use it (``density`` but for ties / dare_* /
magnitude_prune, ``majority_sign_method`` but for ties / dare_ties, ``seed`` but for dare_*;
``lorakit.combining.OPTION_METHODS``) is a 400 naming that entry, as ``combine`` refuses it
(``lorakit.serve.mixture_requests.parse_mixture`` checks the field).

``linear`` (LoRAX's default name) is the exact weighted sum of the updates,
``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ`` (lorakit's ``cat``, rank Σ rᵢ), not PEFT's sums of the A's and B's.

A mixture is computed once: ``Mixtures`` keys it by its settings and the identity of each input
adapter's files (``registry.file_identity``: directory, each file's size, mtime, inode and ctime,
so an adapter replaced at runtime gives a new key), keeps the combined tensors of the last
``cached`` mixtures in memory, and loads the result into the adapter bank under the name
``mixture:<key>``, where it is an adapter like any other: served in the same mixed batches,
evicted by the bank's LRU policy and read back from memory (recombined only when the memory
cache dropped it too). ``combined`` counts the ``lorakit.combine`` calls. An input whose own
base fingerprint is missing or partial is logged as ``load_adapter`` warns
(``base_verdicts.unverified_note``); an input whose directory was deleted leaves the registry
(``ServedAdapters.drop_if_deleted``), and the 400 answers show no server paths.

A mixture names each adapter once and at most ``MAX_IDS`` of them (a 400 on
``merged_adapters.ids`` otherwise: repeating an adapter is giving it a larger weight). ``cat``
adds the inputs' ranks: their sum is checked against the bank's ``max_rank`` from the files'
headers, before any tensor data is read; the other methods' ``rank`` is checked against it
before combining, and so is an input the bank cannot serve in any mixture (a LoRA on an
embedding layer: a 400 naming that input, ``mixture_requests.check_inputs``). Combining runs
outside the cache's lock, one combination per mixture at a time: a request for a mixture being
combined waits for that combination (its result or its error) instead of combining it again,
and requests for other mixtures never wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict

from lorakit.combining import combine
from lorakit.combining.combined import FactorRangeError
from lorakit.errors import UserError
from lorakit.io import base_verdicts
from lorakit.io.keys import base_weight_key, lora_key_pairs, lora_keys
from lorakit.io.read import read_adapter_header
from lorakit.io.tensors import MAX_ABS_VALUE, unwritable
from lorakit.serve.adapter_dirs import BrokenAdapterError
from lorakit.serve.mixture_requests import (
    FIELD,
    MAX_IDS,
    Mixture,
    bad_mixture,
    check_inputs,
    parse_mixture,
)
from lorakit.serve.protocol import APIError
from lorakit.serve.registry import ServedAdapters, file_identity

__all__ = ["FIELD", "MAX_IDS", "PREFIX", "Mixture", "Mixtures", "parse_mixture"]

log = logging.getLogger(__name__)

PREFIX = "mixture:"  # bank names of mixtures; ':' is never part of an adapter's name
_REMEMBERED = 1024  # mixture settings kept for recombining (tensors: ``cached``)


class Mixtures:
    """Mixtures of the adapters ``adapters`` serves (module docstring). ``read`` is the engine's
    adapter loader for every bank name: mixtures from here, the rest from ``fallback``."""

    def __init__(self, adapters: ServedAdapters, fallback, *, cached: int = 16) -> None:
        self.adapters = adapters
        self.fallback = fallback
        self.cached = cached
        self.combined = 0  # lorakit.combine calls made
        self._lock = threading.Lock()  # the caches and ``_combining`` (never held to combine)
        self._combining: dict[str, Future] = {}  # name -> the combination under way
        self._settings: OrderedDict[str, Mixture] = OrderedDict()
        self._tensors: OrderedDict[str, tuple] = OrderedDict()  # name -> (config, tensors)

    def name_of(self, mixture: Mixture) -> str:
        """``mixture:<key>``; 400 when an input is not a served adapter."""
        inputs = []
        registry = self.adapters.registry
        for adapter in mixture.ids:
            try:
                served = registry.discover(adapter)
            except BrokenAdapterError as error:
                raise bad_mixture(f"'{FIELD}.ids': {error}", "ids") from None
            if not served or self.adapters.drop_if_deleted(adapter, registry.path(adapter)):
                raise bad_mixture(
                    f"'{FIELD}.ids': the adapter {adapter!r} is not served; see GET /v1/models",
                    "ids",
                )
            inputs.append([adapter, *file_identity(registry.path(adapter))])
        text = json.dumps([asdict(mixture), inputs], sort_keys=True)
        return PREFIX + hashlib.sha256(text.encode()).hexdigest()[:24]

    def prepare(self, mixture: Mixture) -> str:
        """Combine ``mixture`` unless it is cached and return its bank name; 400 when it cannot
        be combined or served (the message says which adapter or setting)."""
        name = self.name_of(mixture)
        self._tensors_of(name, mixture)
        return name

    def read(self, name: str):
        """``(config, tensors)`` of a bank name: a mixture from memory (recombined if dropped),
        anything else from ``fallback``. ``KeyError`` for a mixture never prepared."""
        if not name.startswith(PREFIX):
            if self.fallback is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            return self.fallback(name)
        with self._lock:
            mixture = self._settings.get(name)
        if mixture is None:
            raise KeyError(f"mixture {name!r} is unknown; send its {FIELD} again")
        try:
            return self._tensors_of(name, mixture)
        except APIError as error:  # an input changed or left since
            raise UserError(error.message) from None

    def _tensors_of(self, name: str, mixture: Mixture) -> tuple:
        """``(config, tensors)`` of mixture ``name``: from memory, else combined by this thread
        outside the lock, while other callers for ``name`` wait for its result or its error
        (``Future``); mixtures of other names neither wait nor are waited for."""
        with self._lock:
            if name in self._tensors:
                self._remember(name, mixture)
                return self._tensors[name]
            flight = self._combining.get(name)
            leading = flight is None
            if leading:
                flight = self._combining[name] = Future()
        if not leading:
            return flight.result()  # (raises the combining thread's error)
        try:
            result = self._combine(name, mixture)
        except BaseException as error:
            with self._lock:
                del self._combining[name]
            flight.set_exception(error)
            raise
        with self._lock:
            self._tensors[name] = result
            self._remember(name, mixture)
            del self._combining[name]
            self._trim()
        flight.set_result(result)
        return result

    def _remember(self, name: str, mixture: Mixture) -> None:
        """Mark ``name`` most recently used in both caches (under the lock)."""
        self._tensors.move_to_end(name)
        self._settings[name] = mixture
        self._settings.move_to_end(name)

    def _trim(self) -> None:
        while len(self._tensors) > self.cached:
            self._tensors.popitem(last=False)
        while len(self._settings) > _REMEMBERED:
            self._settings.popitem(last=False)

    def _combine(self, name: str, mixture: Mixture):
        """``lorakit.combine`` over the inputs' directories, checked against the bank and the
        served base model; ``(config, PEFT-keyed tensors)``."""
        registry = self.adapters.registry
        try:
            directories = [registry.inside(registry.path(i), i) for i in mixture.ids]
            headers = [read_adapter_header(directory) for directory in directories]
            check_inputs(mixture, headers, self.adapters.bank.max_rank)
            with self._lock:
                self.combined += 1
            result = combine(
                directories,
                list(mixture.weights),
                method=mixture.method,
                rank=mixture.rank,
                density=mixture.density,
                majority_sign_method=mixture.majority_sign_method,
                seed=mixture.seed,
            )
        except FactorRangeError as error:  # (the weights: combine's check of the factors)
            reason = registry.relative(_text(error))
            raise bad_mixture(f"'{FIELD}' cannot be combined: {reason}", "weights") from None
        except (UserError, KeyError, ValueError) as error:
            reason = registry.relative(_text(error))  # (no server paths in the answer)
            raise bad_mixture(f"'{FIELD}' cannot be combined: {reason}") from None
        tensors = {}
        for module, (lora_A, lora_B) in result.factors.items():
            key_A, key_B = lora_keys(module, module in result.embeddings)
            tensors[key_A], tensors[key_B] = lora_A, lora_B
        copies = {  # base weights the inputs carry: checked as one adapter's (serve.checks)
            base_weight_key(module, adapted=module in result.factors): weight
            for module, weight in result.base_weights.items()
        }
        self._check_fits(name, mixture, result, tensors | copies)
        self._warn_unverified(mixture.ids, directories)
        return result.config, tensors

    def _warn_unverified(self, ids: tuple[str, ...], directories) -> None:
        """Log ``base_verdicts.unverified_note`` (``load_adapter``'s warning) for each input whose
        own fingerprint is missing or covers only some of its modules: in the mixture's union
        another input's entry checks that input's base, not this one's."""
        mixed = ", ".join(repr(adapter) for adapter in ids)
        for adapter, directory in zip(ids, directories, strict=True):
            try:
                header = read_adapter_header(directory)
            except UserError:  # replaced since combine read it: a new key next time
                continue
            note = base_verdicts.unverified_note(
                self.adapters.model,
                header.fingerprint,
                f"{adapter!r} (in the mixture of {mixed})",
                sorted(lora_key_pairs(header.tensors)),
            )
            if note is not None:
                log.warning("%s", note)

    def _check_fits(self, name: str, mixture: Mixture, result, tensors) -> None:
        """A 400 unless the combined tensors fit the bank and the inputs' fingerprint (their
        union) fits the served base; and one on ``weights`` when a combined tensor holds values
        an adapter file may not (``io.tensors.unwritable``: inf/NaN, or beyond
        +-``MAX_ABS_VALUE``, what ``read_adapter`` refuses in a file; ``combine`` refuses such
        factors itself, e.g. from weights of 1e20, so this catches the carried base weights)."""
        for key, tensor in sorted(tensors.items()):
            if unwritable(tensor):
                raise bad_mixture(
                    f"'{FIELD}' with these weights gives {key} values beyond +-{MAX_ABS_VALUE:g} "
                    "(or inf/NaN), which no adapter file may hold; use smaller weights",
                    "weights",
                )
        try:
            self.adapters.bank.check_shapes(name, result.config, tensors)
            base_verdicts.refuse_other_base(
                self.adapters.model,
                result.fingerprint or None,
                f"mixture of {', '.join(repr(adapter) for adapter in mixture.ids)}",
                list(result.factors),
                allow_mismatch=self.adapters.allow_base_mismatch,
                remedy="Mix adapters of the served base model.",
                trained_on=result.config.base_model_name_or_path,
                local_paths=False,
            )
        except UserError as error:
            hint = ""
            if "max_rank" in str(error):
                hint = _rank_hint(mixture.method, self.adapters.bank.max_rank)
            reason = self.adapters.registry.relative(_text(error))
            raise bad_mixture(f"'{FIELD}' cannot be served: {reason}{hint}") from None


def _rank_hint(method: str, max_rank: int) -> str:
    """What to ask for instead when a mixture by ``method`` is over the bank's ``max_rank``."""
    if method == "cat":
        return (
            " A mixture by 'cat' / 'linear' has the sum of the ranks; ask for merge_strategy "
            f"'svd' with 'rank' <= {max_rank} instead, or mix fewer adapters."
        )
    return f" Ask for merge_strategy {method!r} with 'rank' <= {max_rank}."


def _text(error: BaseException) -> str:
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)
