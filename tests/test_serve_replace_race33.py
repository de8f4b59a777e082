"""An adapter directory redeployed (``rm -rf`` + copy, same shapes, another ``lora_alpha``) while a
load of it is under way, review 33.

- "stale": the load of ``ad0`` had read all the old files when the directory was replaced; a
  request made after the redeploy waited for that load (one load per adapter) and was served
  the old weights. Now ``ServedAdapters.ensure_loaded`` takes the files' identity on arrival and
  loads again when the load it waited for read other files.
- "mix": the load had read the old config and header, not the data: the bank held the NEW
  tensors with the OLD ``lora_alpha``. Now a read is kept only when the files' identity is the
  same before and after it (``_read_unchanged``), and ``io.read.read_adapter_data`` refuses a
  config or header that changed since it was read.

The interleavings are held with events in hooks (the bank's ``prepare``: the files are read,
nothing committed; ``registry.read_adapter_data``: config and header read, not the data; the
bank's ``_loading`` map: a request has reached the lazy load and waits). Values: the bank's
logits (``routed``, before any later request could reload it) against ``load_adapter`` of the
directory as it is on disk, in float64. Adapters: ad0..ad3 of ``tests/serving.py`` (r=2,
``lora_alpha`` 4..7, the same shapes).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
import lorakit.serve.registry as registry_module
from lorakit.errors import AdapterFileError
from lorakit.io.read import read_adapter_data, read_adapter_header
from lorakit.serve import routed
from lorakit.serve.registry import READ_TRIES
from tests.serving import Served, base_model, run_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WAIT = 30  # seconds: a hook that waits longer than this has deadlocked
WEIGHTS = "adapter_model.safetensors"
PROMPT_IDS = [5, 6, 7, 8, 9, 10]


@pytest.fixture
def root(adapter_files_copy) -> Path:
    """A copy of the adapters ad0..ad3 under ``tmp_path/adapters`` (conftest)."""
    return adapter_files_copy


@pytest.fixture
def served(root, adapter_files) -> Served:
    return Served(root, adapter_files[1])


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Counts the reads of adapter files (``ServedAdapters._read``, failed ones too) by thread."""
    counts: Counter = Counter()
    real = registry_module.ServedAdapters._read

    def counted(self, name, path):
        counts[threading.current_thread().name] += 1
        return real(self, name, path)

    monkeypatch.setattr(registry_module.ServedAdapters, "_read", counted)
    return counts


def _redeploy(root: Path, name: str, source: str) -> None:
    """``rm -rf adapters/name && cp -r adapters/source adapters/name``."""
    shutil.rmtree(root / "adapters" / name)
    shutil.copytree(root / "adapters" / source, root / "adapters" / name)


def _alpha(directory: Path) -> float:
    return json.loads((directory / "adapter_config.json").read_text())["lora_alpha"]


def _request(served: Served, name: str):
    """What a completion for ``name`` does before it runs (``app._adapter_for``)."""
    assert served.adapters.registry.discover(name)
    served.adapters.ensure_loaded(name)
    return "served"


def _pause_in_prepare(monkeypatch, served: Served, thread: str, paused, go_on) -> None:
    """The bank's ``prepare`` (files read, nothing committed) in ``thread`` sets ``paused`` and
    waits for ``go_on``."""
    real = served.bank.prepare

    def prepare(*args, **kwargs):
        if threading.current_thread().name == thread:
            paused.set()
            assert go_on.wait(WAIT), "the test's interleaving deadlocked"
        return real(*args, **kwargs)

    monkeypatch.setattr(served.bank, "prepare", prepare)


class _Watched(dict):
    """The bank's ``_loading`` map; ``get`` from thread ``thread`` (under the bank's lock, in
    ``_lazy_load``: that thread has reached the lazy load, and waits for a load under way)
    sets ``reached``."""

    def __init__(self, items, thread: str, reached: threading.Event) -> None:
        super().__init__(items)
        self.thread, self.reached = thread, reached

    def get(self, key, default=None):
        if threading.current_thread().name == self.thread:
            self.reached.set()
        return super().get(key, default)


def _bank_logits(served: Served, name: str) -> torch.Tensor:
    """The served model's last-position logits of ``PROMPT_IDS`` with the bank's ``name``."""
    ids = torch.tensor([PROMPT_IDS])
    slots = torch.full_like(ids, served.bank.slot_of(name))
    with torch.no_grad(), routed(served.bank, slots):
        return served.engine.model(ids).logits[0, -1].double()


def _fresh_logits(directory: Path, tokenizer) -> torch.Tensor:
    """The same with ``load_adapter`` of ``directory`` on a plain base model."""
    model = base_model(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.load_adapter(model, directory)
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0, -1].double()


def _assert_bank_serves(served: Served, name: str, directory: Path) -> None:
    """The bank's ``name`` is the adapter at ``directory``: its config and its logits."""
    assert served.bank.config(name).lora_alpha == _alpha(directory)
    got, expected = _bank_logits(served, name), _fresh_logits(directory, served.tokenizer)
    assert float((got - expected).abs().max()) < 1e-4


# 1. "stale": a request after the redeploy waited for a load of the old files


def test_a_request_after_a_redeploy_is_not_served_the_load_of_the_old_files_it_waited_for(
    root, served, reads, monkeypatch
) -> None:
    """A's load has read the old ad0 (alpha 4) and is about to write it into the bank when
    ad0 is replaced by a copy of ad1 (alpha 5). B, made after the copy is complete, waits for
    A's load; before the fix it was served A's old weights (until the request after it). Now
    B evicts that load and reads the new files; A (which arrived before) is served as read."""
    target = root / "adapters" / "ad0"
    old = _fresh_logits(target, served.tokenizer)
    paused, go_on, reached = threading.Event(), threading.Event(), threading.Event()
    _pause_in_prepare(monkeypatch, served, "A", paused, go_on)
    results: dict = {}

    request_a = run_in_thread(lambda: _request(served, "ad0"), "A", results)
    assert paused.wait(WAIT)
    _redeploy(root, "ad0", "ad1")  # complete before B starts
    served.bank._loading = _Watched(served.bank._loading, "B", reached)
    request_b = run_in_thread(lambda: _request(served, "ad0"), "B", results)
    assert reached.wait(WAIT)  # B is in the bank's lazy load, A's load under way
    assert "ad0" in served.bank._loading and "ad0" not in served.bank
    go_on.set()
    request_a.join(WAIT), request_b.join(WAIT)

    assert results == {"A": "served", "B": "served"}
    assert _alpha(target) == 5
    _assert_bank_serves(served, "ad0", target)
    assert reads == {"A": 1, "B": 1}  # A's old files once, then the new ones once
    assert float((_bank_logits(served, "ad0") - old).abs().max()) > 1e-3  # (not the old one)


def test_unchanged_files_are_loaded_once_for_requests_that_wait_for_the_load(
    root, served, reads, monkeypatch
) -> None:
    """Nothing replaced: B waits for A's load and is served it, nothing read twice."""
    paused, go_on, reached = threading.Event(), threading.Event(), threading.Event()
    _pause_in_prepare(monkeypatch, served, "A", paused, go_on)
    results: dict = {}

    request_a = run_in_thread(lambda: _request(served, "ad0"), "A", results)
    assert paused.wait(WAIT)
    served.bank._loading = _Watched(served.bank._loading, "B", reached)
    request_b = run_in_thread(lambda: _request(served, "ad0"), "B", results)
    assert reached.wait(WAIT)
    go_on.set()
    request_a.join(WAIT), request_b.join(WAIT)

    assert results == {"A": "served", "B": "served"}
    assert reads == {"A": 1}
    _assert_bank_serves(served, "ad0", root / "adapters" / "ad0")


# 2. "mix": config and header of the old files, data of the new ones


def test_a_read_interrupted_by_a_redeploy_is_read_again_never_a_mix(
    root, served, reads, monkeypatch
) -> None:
    """A's load has read ad0's config (alpha 4) and header, not the data, when ad0 is replaced
    by a copy of ad1 (alpha 5). Before the fix the bank held ad1's tensors with alpha 4 (a mix,
    served until the next request); now the read is done again, from the new files."""
    target = root / "adapters" / "ad0"
    paused, go_on = threading.Event(), threading.Event()
    real = registry_module.read_adapter_data
    first = [True]

    def read_data(header):
        if first[0] and threading.current_thread().name == "A":
            first[0] = False
            paused.set()
            assert go_on.wait(WAIT), "the test's interleaving deadlocked"
        return real(header)

    monkeypatch.setattr(registry_module, "read_adapter_data", read_data)
    results: dict = {}

    request_a = run_in_thread(lambda: _request(served, "ad0"), "A", results)
    assert paused.wait(WAIT)
    _redeploy(root, "ad0", "ad1")
    go_on.set()
    request_a.join(WAIT)

    assert results == {"A": "served"}
    assert served.bank.config("ad0").lora_alpha == 5
    _assert_bank_serves(served, "ad0", target)
    assert reads == {"A": 2}


def test_files_that_change_during_every_read_are_refused_naming_the_adapter(
    root, served, reads, monkeypatch
) -> None:
    """A directory redeployed again during each read (between header and data): after
    ``READ_TRIES`` reads the request is refused, saying why and to retry; nothing is loaded.
    Before the fix the first read's mix was loaded without a word."""
    real = registry_module.read_adapter_data
    sources = iter(["ad1", "ad2", "ad3", "ad1"])
    stamp = [1_000_000_000_000_000_000]

    def read_data(header):
        _redeploy(root, "ad0", next(sources))
        stamp[0] += 1_000_000_000  # (a new mtime each time, whatever the clock's tick)
        for file_name in ("adapter_config.json", WEIGHTS):
            os.utime(root / "adapters" / "ad0" / file_name, ns=(stamp[0], stamp[0]))
        return real(header)

    monkeypatch.setattr(registry_module, "read_adapter_data", read_data)
    with pytest.raises(AdapterFileError, match="'ad0': its files changed while being read"):
        served.adapters.ensure_loaded("ad0")
    assert sum(reads.values()) == READ_TRIES
    assert "ad0" not in served.bank


# 3. io.read: a config replaced between the header and the data


def _peft_style(directory: Path) -> None:
    """Drop lorakit's metadata (config copy, fingerprint) from ``directory``'s weights, as a
    PEFT save has none: only ``adapter_config.json`` then says ``lora_alpha``."""
    weights = directory / WEIGHTS
    save_file(load_file(weights), weights, metadata={"format": "pt"})


def test_read_adapter_data_refuses_files_replaced_after_the_header(root) -> None:
    """``read_adapter_header`` of a PEFT-style ad0 (alpha 4), then the directory replaced by
    ad1 (alpha 5, same shapes): before the fix ``read_adapter_data`` returned ad1's tensors with
    ad0's config; now it is refused as changed while being read, and a new read is ad1."""
    adapters = root / "adapters"
    for name in ("ad0", "ad1"):
        _peft_style(adapters / name)
    header = read_adapter_header(adapters / "ad0")
    assert header.config.lora_alpha == 4
    _redeploy(root, "ad0", "ad1")
    assert read_adapter_header(adapters / "ad0").tensors == header.tensors  # (same entries)
    with pytest.raises(AdapterFileError, match="changed while it was being read"):
        read_adapter_data(header)
    again = read_adapter_data(read_adapter_header(adapters / "ad0"))
    assert again.config.lora_alpha == 5
    expected = load_file(adapters / "ad1" / WEIGHTS)
    assert again.tensors.keys() == expected.keys()
    assert all(torch.equal(again.tensors[key], expected[key]) for key in expected)
