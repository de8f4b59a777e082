"""A runtime load (``ServedAdapters.add``, vLLM's /v1/load_lora_adapter) racing requests for a
directory added after start-up (``AdapterRegistry.discover``), review 30.

``add`` used to check the name, read the files outside any lock, load them into the bank and
only then register the name: a request that found the directory meanwhile registered it and
started its own lazy load, ``register`` then failed in ``add`` and its clean-up
(``bank.forget``) cancelled the request's load, a 404 "was unloaded while it was being read"
although nobody unloaded anything. Now ``add`` takes the name first (under the bank's lock) and
loads through the bank's lazy load: whoever registers first wins, the loser touches nothing,
the adapter is read once and the request is served.

The interleavings are forced with events: hooks on ``ServedAdapters._read`` (who reads, and a
pause after the read) and on the bank's ``_loading`` map (a request has reached the bank's
lazy load). Served values are compared with a fresh ``lorakit.load_adapter`` on a plain model.
Adapters: ad0..ad3 of ``tests/serving.py`` (2 slots, max rank 4); ``late`` is a copy of ad2
made after start-up, ``other`` one of ad3.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import UserError
from lorakit.serve.adapter_dirs import AdapterNameError, AdapterRegistry
from lorakit.serve.registry import ServedAdapters
from tests.serving import Served, fresh_logprobs, run_in_thread, served_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WAIT = 30  # seconds: a hook that waits longer than this has deadlocked


@pytest.fixture
def root(adapter_files_copy) -> Path:
    """A copy of the adapters ad0..ad3 under ``tmp_path/adapters`` (conftest)."""
    return adapter_files_copy


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Counts the adapter reads (``ServedAdapters._read``) by thread name."""
    counts: Counter = Counter()
    real = ServedAdapters._read

    def counted(self, name, path):
        adapter = real(self, name, path)
        counts[threading.current_thread().name] += 1
        return adapter

    monkeypatch.setattr(ServedAdapters, "_read", counted)
    return counts


def _pause_after_read(monkeypatch, thread_name: str, done: threading.Event, go_on: threading.Event):
    """``_read`` in thread ``thread_name`` sets ``done`` after reading, then waits for ``go_on``."""
    real = ServedAdapters._read

    def paused(self, name, path):
        adapter = real(self, name, path)
        if threading.current_thread().name == thread_name:
            done.set()
            assert go_on.wait(WAIT), "the test's interleaving deadlocked"
        return adapter

    monkeypatch.setattr(ServedAdapters, "_read", paused)


class _Watched(dict):
    """The bank's ``_loading`` map; ``get`` from thread ``thread_name`` (under the bank's lock, in
    ``_lazy_load``: that thread has reached the lazy load) sets ``reached``."""

    def __init__(self, items, thread_name: str, reached: threading.Event) -> None:
        super().__init__(items)
        self.thread_name, self.reached = thread_name, reached

    def get(self, key, default=None):
        if threading.current_thread().name == self.thread_name:
            self.reached.set()
        return super().get(key, default)


def _request(adapters: ServedAdapters, name: str):
    """What a completion for ``name`` does before it runs (``app._served_adapter``)."""
    assert adapters.registry.discover(name)
    adapters.ensure_loaded(name)
    return "served"


def _copy(root: Path, source: str, name: str) -> Path:
    directory = root / "adapters" / name
    shutil.copytree(root / "adapters" / source, directory)
    return directory


def _assert_serves(served: Served, name: str, directory: Path) -> None:
    """Completions for ``name`` give ``directory``'s adapter's log-probabilities."""
    got = served_logprobs(served, name)
    expected = fresh_logprobs(directory, served.tokenizer)
    assert len(got) == len(expected) > 0
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4, (got, expected)


def test_a_request_arriving_while_a_runtime_load_reads_is_served_by_that_load(
    root, adapter_files, reads, monkeypatch
) -> None:
    """The reviewer's interleaving: the admin load of ``late`` has read its files when a request
    for ``late`` arrives. Before the fix the request registered the directory and started its
    own load, which the admin's failed ``register`` cancelled (KeyError, a 404). Now the name
    is the admin's before it reads: the request waits for that load, nothing is read twice."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    adapters, bank = served.adapters, served.bank
    late = _copy(root, "ad2", "late")  # added after start-up
    admin_read, go_on, reached = threading.Event(), threading.Event(), threading.Event()
    _pause_after_read(monkeypatch, "admin", admin_read, go_on)
    bank._loading = _Watched(bank._loading, "request", reached)
    results: dict = {}

    admin = run_in_thread(lambda: adapters.add("late", None), "admin", results)
    assert admin_read.wait(WAIT)
    request = run_in_thread(lambda: _request(adapters, "late"), "request", results)
    assert reached.wait(WAIT)  # the request is in the bank's lazy load
    go_on.set()
    admin.join(WAIT), request.join(WAIT)

    assert results == {"admin": True, "request": "served"}
    assert adapters.registry.path("late") == late
    assert "late" in bank and bank.names().count("late") == 1
    assert reads == {"admin": 1}  # read once, by the admin load
    with served.client:
        _assert_serves(served, "late", late)


def test_a_runtime_load_of_a_name_a_request_found_first_is_refused_touching_nothing(
    root, adapter_files, reads, monkeypatch
) -> None:
    """A request found ``adapters/late`` and reads it; an admin load of ``late`` (from ``other``)
    meanwhile is an ``AdapterNameError`` "already loaded" (a 400) that reads nothing and leaves
    the request's load under way: the request gets ``late``'s own values."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    adapters, bank = served.adapters, served.bank
    late, _ = _copy(root, "ad2", "late"), _copy(root, "ad3", "other")
    request_read, go_on = threading.Event(), threading.Event()
    _pause_after_read(monkeypatch, "request", request_read, go_on)
    results: dict = {}

    request = run_in_thread(lambda: _request(adapters, "late"), "request", results)
    assert request_read.wait(WAIT)
    with pytest.raises(AdapterNameError, match="'late' is already loaded"):
        adapters.add("late", "other")
    assert "late" in bank._loading and "late" not in bank  # the request's load still under way
    go_on.set()
    request.join(WAIT)

    assert results == {"request": "served"}
    assert adapters.registry.path("late") == late
    assert reads == {"request": 1}
    with served.client:
        _assert_serves(served, "late", late)


def test_a_discovery_just_before_the_runtime_load_registers_wins(
    root, adapter_files, reads, monkeypatch
) -> None:
    """A request's discovery of ``adapters/late`` lands just before the admin load of ``late``
    (from ``other``) registers the name: the load is an ``AdapterNameError`` (before the fix a
    ``ValueError`` after it had read ``other`` into the bank under ``late``, which it then
    forgot); the name stays ``late``'s directory and serves its values."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    adapters, bank = served.adapters, served.bank
    late, _ = _copy(root, "ad2", "late"), _copy(root, "ad3", "other")
    real_register = AdapterRegistry.register

    def register_after_a_discovery(self, name, path):
        assert self.discover(name)  # (a request's: the registry's lock only)
        return real_register(self, name, path)

    monkeypatch.setattr(AdapterRegistry, "register", register_after_a_discovery)
    with pytest.raises(AdapterNameError, match="'late' is already loaded"):
        adapters.add("late", "other")
    assert reads == {} and "late" not in bank  # the loser read nothing, loaded nothing
    assert adapters.registry.path("late") == late
    assert _request(adapters, "late") == "served"
    assert reads == {"MainThread": 1}
    with served.client:
        _assert_serves(served, "late", late)


def test_a_runtime_load_of_a_fresh_name_still_loads_it(root, adapter_files, reads) -> None:
    """``add`` of a name nobody uses: registered, read once, loaded, serving its values."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    late = _copy(root, "ad2", "late")
    assert served.adapters.add("fresh", "late") is True
    assert served.adapters.registry.path("fresh") == late
    assert "fresh" in served.bank and reads == {"MainThread": 1}
    with served.client:
        _assert_serves(served, "fresh", late)
    assert reads == {"MainThread": 1}  # (the request found it loaded)


def _with_nan(root: Path, source: str, name: str) -> Path:
    """A copy of ``adapters/source`` whose first tensor is NaN (refused after the data is read)."""
    directory = _copy(root, source, name)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    return directory


def test_a_failed_runtime_load_leaves_nothing_and_a_withdrawn_name_withdrawn(
    root, adapter_files
) -> None:
    """A runtime load refused after reading (NaN values) leaves the name unregistered, out of
    the bank, no load under way; ``ad1``, unloaded before, stays withdrawn (not found again
    from ``adapters/ad1``) until a runtime load succeeds."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    adapters, bank = served.adapters, served.bank
    _with_nan(root, "ad2", "broken")
    for name in ("fresh", "ad1"):
        if name == "ad1":
            adapters.ensure_loaded("ad1")
            adapters.remove("ad1")
        with pytest.raises(UserError, match="holds inf/NaN values"):
            adapters.add(name, "broken")
        assert name not in adapters.registry and name not in bank
        assert name not in bank._loading
    assert not adapters.registry.discover("ad1")  # still withdrawn
    assert adapters.add("ad1", None) is True
    with served.client:
        _assert_serves(served, "ad1", root / "adapters" / "ad1")


def test_an_unload_during_a_runtime_load_wins_and_leaves_nothing(
    root, adapter_files, monkeypatch
) -> None:
    """An unload of ``late`` while its runtime load reads the files: the load fails with an
    ``AdapterNameError`` saying so, and nothing is left (not registered, not in the bank, not
    found again from its directory)."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    adapters, bank = served.adapters, served.bank
    _copy(root, "ad2", "late")
    admin_read, go_on = threading.Event(), threading.Event()
    _pause_after_read(monkeypatch, "admin", admin_read, go_on)
    results: dict = {}

    admin = run_in_thread(lambda: adapters.add("late", None), "admin", results)
    assert admin_read.wait(WAIT)
    adapters.remove("late")
    go_on.set()
    admin.join(WAIT)

    assert isinstance(results["admin"], AdapterNameError), results
    assert "unloaded" in str(results["admin"])
    assert "late" not in adapters.registry and "late" not in bank
    assert not adapters.registry.discover("late")
