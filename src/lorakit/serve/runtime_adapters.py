"""``RuntimeAdapters``: ``ServedAdapters``'s adding and removing of adapters while the server
runs (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``), each one step under the
bank's lock so that a request meanwhile never loads a name the registry no longer has.

A mixin of ``serve/registry.py``'s ``ServedAdapters``: it uses that class's ``bank``,
``registry``, ``_identities``, ``_note_identity`` and ``_read_unchanged`` (every check a lazy
load makes).
"""

from __future__ import annotations

from pathlib import Path

from lorakit.serve.adapter_dirs import AdapterNameError
from lorakit.serve.residency import AdapterInUseError, BankFullError

__all__ = ["RuntimeAdapters"]


class RuntimeAdapters:
    """``add`` and ``remove`` of ``ServedAdapters`` (with ``add``'s load and its undo)."""

    def add(self, name: str, relative_path: str | None) -> bool:
        """Register ``root/relative_path`` as ``name`` and load it, after every check a lazy
        load makes (errors leave nothing behind). True: loaded; False: every slot is pinned or
        used by running requests, so it is registered only and read again on its first
        request, as the adapters found at start-up (vLLM registers it too).

        The name is taken first, in one step under the bank's lock and the registry's: a request
        that found ``root/name`` first (``AdapterRegistry.discover`` registers under the
        registry's lock only) wins, and this is an ``AdapterNameError`` that touches neither the
        bank nor that request's load under way. Once taken, every load of ``name`` reads this
        path, and this one is the bank's lazy load (``_load_added``): a request meanwhile waits
        for it instead of reading the files again, and never has its load cancelled by it.
        """
        path = self.registry.resolve(name, relative_path)
        with self.bank.lock:  # (the lock order of remove and drop_if_deleted: bank, registry)
            try:
                was_withdrawn = self.registry.register(name, path)
            except ValueError:
                raise AdapterNameError(
                    f"adapter {name!r} is already loaded; unload it first."
                ) from None
        try:
            return self._load_added(name, path)
        except BaseException as error:
            self._undo_add(name, path, was_withdrawn)
            if isinstance(error, KeyError):  # (bank.forget: unloaded, or its directory deleted)
                raise AdapterNameError(
                    f"adapter {name!r} was unloaded, or its directory deleted, while it was "
                    "being loaded; load it again."
                ) from None
            raise

    def _load_added(self, name: str, path: Path) -> bool:
        """``add``'s load of ``name`` (registered to ``path``) through ``bank.ensure_loaded``: one
        load of a name at a time, so the bank never holds it twice nor this read's tensors under
        another registration (``remove`` meanwhile makes it fail with ``KeyError``). False when
        no slot or pages are free now (``BankFullError``: pinned or used by running requests);
        the files are still read and checked. Never for good: every pool holds the pages of an
        adapter of the bank's ``max_rank``, which ``_read`` checks."""
        read = []

        def loader(_name: str):
            adapter, identity = self._read_unchanged(name, path)
            read.append(adapter)
            self._note_identity(name, path, identity)  # (none once unloaded meanwhile)
            return adapter.config, adapter.tensors

        try:
            self.bank.ensure_loaded(name, loader)
        except BankFullError:
            if not read:  # (no room even to try: checked all the same)
                self._read_unchanged(name, path)
            self._identities.pop(name, None)  # (set by the read on its first request)
            return False
        return True

    def _undo_add(self, name: str, path: Path, was_withdrawn: bool) -> None:
        """After a failed ``add``: evict and unregister ``name`` in one step under the bank's
        lock (as ``remove``), withdrawn again if it was. Nothing changes when it was removed
        (or added again) meanwhile, or a running request uses a copy loaded since."""
        with self.bank.lock:
            try:
                if self.registry.path(name) != path:
                    return
                self.bank.forget(name)
            except (KeyError, AdapterInUseError):
                return
            self.registry.unregister(name, withdrawn=was_withdrawn)
            self._identities.pop(name, None)

    def remove(self, name: str) -> None:
        """Evict and forget ``name``: ``KeyError`` when unknown, ``AdapterInUseError`` (nothing
        changes) while a running request uses it.

        One step under the bank's lock, and ``bank.forget`` makes loads of ``name`` already
        reading its files fail: a request arriving meanwhile can never load the adapter back
        into the bank after it left the registry (a name stuck in the bank, unloadable).
        """
        with self.bank.lock:
            self.registry.path(name)
            self.bank.forget(name)
            self.registry.unregister(name, withdrawn=True)
            self._identities.pop(name, None)  # (a load of it again starts afresh)
