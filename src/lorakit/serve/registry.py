"""What the server serves: ``ServedAdapters`` reads, checks and loads the adapters of an
``AdapterRegistry`` (``serve/adapter_dirs.py``: names -> PEFT directories inside one root
directory) into the bank.

Files are read with ``lorakit.io.read_adapter`` (safetensors only, never pickle), keys and shapes
checked against the bank from the header before the data is read, then values and the base
fingerprint. An adapter whose base fingerprint is missing or covers only some of its modules is
served with ``load_adapter``'s warning, logged (``base_verdicts.unverified_note``). An adapter
whose directory is deleted while served leaves the registry on its next request
(``drop_if_deleted``) and is found again once it is back; one whose files are replaced is read
again (``file_identity``). A read is kept only when the files' identity is the same before and
after it (config, header and data of one version, never a mix), and a request that found the
new files on arrival is never served a load of the old ones that it waited for
(``ensure_loaded``); one whose adapter an admin re-points meanwhile (unload, then load from
another ``lora_path``) is served the name's new adapter. The messages for HTTP clients show
paths relative to the adapter directory (``AdapterRegistry.relative``).

Every adapter shares the one unchanged base model, so a PiSSA / OLoRA file PEFT saved without
conversion (``init_lora_weights`` "pissa", "pissa_niter_K", "olora"), whose factors only fit the
residual base that init made, is refused (skipped at start-up, a 400 on a runtime load or a
request), from its config alone (``io.read.refuse_residual_base_factors``). lorakit's own
unconverted saves carry the residual base's fingerprint, which ``check_base`` compares with the
served base: served on that residual model, refused on the original one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from lorakit.errors import AdapterFileError, UserError
from lorakit.io import base_verdicts
from lorakit.io.keys import lora_key_pairs
from lorakit.io.older_peft_files import read_as_written
from lorakit.io.read import (
    AdapterFile,
    read_adapter_data,
    read_adapter_header,
    refuse_residual_base_factors,
)
from lorakit.serve.adapter_dirs import (
    SERVING,
    AdapterGoneError,
    AdapterNameError,
    AdapterRegistry,
    file_identity,
    valid_name,
)
from lorakit.serve.residency import AdapterInUseError
from lorakit.serve.runtime_adapters import RuntimeAdapters

__all__ = [
    "AdapterGoneError",
    "AdapterNameError",
    "AdapterRegistry",
    "ServedAdapters",
    "check_base",
    "file_identity",
    "valid_name",
]

log = logging.getLogger(__name__)

# Reads (or loads) of one adapter whose files change during each of them before the request is
# refused: a redeploy changes them once, so a second read normally finds them settled.
READ_TRIES = 3


def check_base(
    model: nn.Module, adapter: AdapterFile, allow_base_mismatch: bool, label: str | None = None
) -> None:
    """Refuse an adapter whose saved fingerprint says it was trained on other base weights
    (``base_verdicts.refuse_other_base``, naming no local path: HTTP clients read it); with
    ``allow_base_mismatch``, log it and serve it. A fingerprint that is missing or covers only
    some modules is logged as a warning (``base_verdicts.unverified_note``, ``load_adapter``'s
    words). ``label``: how the messages name the adapter (default: its directory)."""
    label = adapter.directory if label is None else label
    module_names = sorted(lora_key_pairs(adapter.tensors))
    note = base_verdicts.unverified_note(model, adapter.fingerprint, label, module_names)
    if note is not None:
        log.warning("%s", note)
    message = base_verdicts.refuse_other_base(
        model,
        adapter.fingerprint,
        label,
        module_names,
        allow_mismatch=allow_base_mismatch,
        remedy="Serve it with its own base model, or start the server with --allow-base-mismatch.",
        trained_on=adapter.config.base_model_name_or_path,
        local_paths=False,
    )
    if message is not None:
        log.warning("%s Serving it anyway (--allow-base-mismatch).", message)


class ServedAdapters(RuntimeAdapters):
    """The registry and the bank together: load on first use, add and remove at runtime
    (``add``, ``remove``: ``serve/runtime_adapters.py``)."""

    def __init__(
        self,
        bank,
        registry: AdapterRegistry,
        model: nn.Module,
        *,
        allow_base_mismatch: bool = False,
    ) -> None:
        self.bank = bank
        self.registry = registry
        self.model = model
        self.allow_base_mismatch = allow_base_mismatch
        self._identities: dict[str, list[object]] = {}  # name -> file_identity when read

    def _read(self, name: str, path: Path) -> AdapterFile:
        """The adapter files at ``path``: keys and shapes checked against the bank from the header
        before the data is read, values and base fingerprint after. A ``UserError``'s message
        shows paths relative to the adapter directory (``AdapterRegistry.relative``)."""
        try:
            path = self.registry.inside(path, name)
            header = read_as_written(read_adapter_header(path), self.model)  # its peft's rules
            refuse_residual_base_factors(header, SERVING, fingerprint_checked=True)
            self.bank.check_shapes(name, header.config, header.tensors)
            adapter = read_adapter_data(header)  # (refused if the tensors changed meanwhile)
            adapter.require_finite()
            check_base(self.model, adapter, self.allow_base_mismatch, label=repr(name))
        except UserError as error:  # (same type, for the callers' except clauses)
            error.args = (self.registry.relative(str(error)), *error.args[1:])
            raise
        return adapter

    def _read_unchanged(self, name: str, path: Path) -> tuple[AdapterFile, list[object]]:
        """``(adapter, identity)``: ``_read`` of ``path`` between two equal ``file_identity``
        stamps, so config, header and data all come from the files that ``identity`` names (a
        redeploy during the read would otherwise pair the old ``lora_alpha`` with the new
        tensors, or keep the old files under the new identity). Read again while they differ,
        also after a read that failed meanwhile (a half-copied directory); ``READ_TRIES``
        reads that all saw a change are an ``AdapterFileError`` naming the adapter."""
        for _ in range(READ_TRIES):
            before = file_identity(path)
            try:
                adapter = self._read(name, path)
            except UserError:
                if file_identity(path) == before:
                    raise  # (the files as they are, not a change meanwhile)
                continue
            if file_identity(path) == before:
                return adapter, before
        raise self._changing(name)

    def _changing(self, name: str) -> AdapterFileError:
        return AdapterFileError(
            f"adapter {name!r}: its files changed while being read ({READ_TRIES} times); retry "
            "once the copy or save of its directory has ended."
        )

    def read(self, name: str):
        """``(config, tensors)`` of a registered adapter, its base fingerprint checked, all read
        from one version of its files (``_read_unchanged``), whose identity is recorded for
        ``ensure_loaded``; ``KeyError`` when it is unknown, or its directory was deleted
        (``drop_if_deleted``)."""
        path = self._served_path(name)
        adapter, identity = self._read_unchanged(name, path)
        self._note_identity(name, path, identity)
        return adapter.config, adapter.tensors

    def _note_identity(self, name: str, path: Path, identity: list[object]) -> None:
        """Record ``identity`` as that of the bank's (coming) copy of ``name``, unless ``name``
        is no longer registered to ``path``: a read that an unload (``remove``, under the same
        lock) overtook records nothing, so ``_identities`` only holds identities of the name's
        registration when they were recorded (its load then fails, or serves the new copy)."""
        with self.bank.lock:
            try:
                if self.registry.path(name) != path:
                    return
            except KeyError:
                return
            self._identities[name] = identity

    def ensure_loaded(self, name: str) -> None:
        """Put a registered adapter into the bank if it is not there (LRU may evict another),
        or read it again if its files were replaced since (``_drop_if_replaced``). ``KeyError``
        when it is unknown, unloaded meanwhile, or its directory was deleted
        (``drop_if_deleted``).

        The files' identity is taken on arrival: a load this call waited for (one load per
        adapter, ``LazyLoads._lazy_load``) that read other files, because it began before a
        redeploy, is evicted and loaded again instead of served. Files changed again after
        arrival are served as read when the bank holds what is on disk now; ``READ_TRIES``
        loads that each missed the files are an ``AdapterFileError``. Unchanged files (the
        common case): one load, however many callers wait for it.

        The name's registration when the load runs is the one served: an admin who unloads
        ``name`` and loads it again from another ``lora_path`` after this call looked it up
        gets this request served the new directory's adapter (the bank holds one copy per
        name; a request sent just after would get the same), and an unload with no new load
        is a ``KeyError`` (404). Such a change is no change of files: nothing is evicted
        for it, and no read is tried again (review 38: three evictions, then a false
        "files changed")."""
        path = self._served_path(name)
        wanted = file_identity(path)  # (on arrival)
        for _ in range(READ_TRIES):
            kept = self._drop_if_replaced(name, wanted)
            self.bank.ensure_loaded(name, self.read)
            loaded = self._identities.get(name)
            if kept or loaded is None or loaded == wanted:
                return
            path = self._served_path(name)  # (re-pointed meanwhile: its new directory serves)
            wanted = file_identity(path)  # (changed again since arrival: newer files serve)
            if loaded == wanted:
                return
        raise self._changing(name)

    def _served_path(self, name: str) -> Path:
        """The directory ``name`` is registered to now; ``KeyError`` when it is not, or that
        directory was deleted (``drop_if_deleted``)."""
        path = self.registry.path(name)
        if self.drop_if_deleted(name, path):
            raise self._gone(name, path)
        return path

    def drop_if_deleted(self, name: str, path: Path) -> bool:
        """Whether the directory ``path`` of adapter ``name`` is gone; then ``name`` is evicted
        and unregistered in one step under the bank's lock, as ``remove`` does (it leaves
        ``/v1/models``), unless a running request still uses it: then it stays until the next
        request after that one looks again. Only ``root/name`` is found again when it is back
        (``AdapterRegistry.discover``): a name a runtime load gave another directory is
        withdrawn, so that it never falls back to ``root/name`` unasked."""
        try:
            if path.is_dir():
                return False
        except OSError:  # (a name the file system refuses: not a directory it has)
            pass
        with self.bank.lock:
            try:
                if self.registry.path(name) != path:
                    return True  # removed (or added again) meanwhile
                self.bank.forget(name)
            except (KeyError, AdapterInUseError):
                return True
            self.registry.unregister(name, withdrawn=not self._returns(name, path))
            self._identities.pop(name, None)
        log.warning("adapter %r: its directory %s was deleted; no longer served", name, path)
        return True

    def _returns(self, name: str, path: Path) -> bool:
        """Whether ``name`` is served again once ``path`` is back: it is ``root/name``."""
        return path == self.registry.root / name

    def _gone(self, name: str, path: Path) -> AdapterGoneError:
        return AdapterGoneError(name, self._returns(name, path))

    def _drop_if_replaced(self, name: str, identity: list[object]) -> bool:
        """Evict ``name`` when the bank's copy was read from files other than ``identity`` (what
        the caller found on disk) in the same directory, so that the load that follows reads
        those. True when the old copy stays: while a request uses (or a replica pins) the old
        weights they stay, with a warning, and the next request looks again. A copy of another
        directory is the name's new registration (re-pointed since the caller looked): kept."""
        known = self._identities.get(name)
        if known is None or known == identity or name not in self.bank:
            return False
        if known[0] != identity[0]:  # (file_identity's directory) another registration's copy:
            return False  # the name was re-pointed since the caller looked, and that copy serves
        with self.bank.lock:
            if name not in self.bank or self._identities.get(name) is not known:
                return False  # evicted, or read again, meanwhile
            try:
                self.bank.evict(name)
            except AdapterInUseError:
                log.warning("adapter %r was replaced on disk; in use, reloaded when free", name)
                return True
        return False
