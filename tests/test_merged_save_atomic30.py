"""``save_merged_model`` killed between any two file system steps: the output directory holds the
complete old merge, the complete new one, or something transformers refuses to load, never a
mix of the two that loads; the staging folder the killed save leaves is removed by a later save.

The kill is simulated in-process: ``os.replace`` / ``rename`` / ``unlink`` / ``remove`` /
``rmdir`` count their calls, the k-th is done and then ``_Killed`` is raised, and every later call
raises again without acting (a killed process does nothing more, not even its clean-up), for
each k of a whole save.
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.io import save_merged_model
from lorakit.io.atomic import STALE_AFTER_S
from lorakit.merge import merge_and_unload
from tests import tiny_models, tiny_tokenizer

_STEPS = ("replace", "rename", "unlink", "remove", "rmdir")


class _Killed(BaseException):
    """The simulated SIGKILL (a BaseException: no ``except Exception`` handler stops it)."""


class _KillAfter:
    """Replaces the file system steps of ``os``: the ``k``-th call is made, then ``_Killed``."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.dead = k, 0, False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in _STEPS:
            monkeypatch.setattr(os, name, self._step(getattr(os, name)))

    def _step(self, real):
        @functools.wraps(real)
        def step(*args, **kwargs):
            if self.dead:  # (the finally blocks of a killed process never run)
                raise _Killed
            result = real(*args, **kwargs)
            self.calls += 1
            if self.calls == self.k:
                self.dead = True
                raise _Killed
            return result

        return step


def _merged(seed: int, dtype: torch.dtype, shard_size: str | None = None) -> torch.nn.Module:
    """A tiny Llama with an adapter of its own (``seed``) merged in, as ``dtype``; saved in shards
    of ``shard_size`` (``model.safetensors.index.json`` + ``model-0000i-of-0000n``) if given."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = lorakit.inject(tiny_models.llama(), config)
    tiny_models.randomize_adapters(model, seed=seed, std=0.3)
    plain = merge_and_unload(model, float_dtype=dtype)
    if shard_size is not None:
        plain.save_pretrained = functools.partial(plain.save_pretrained, max_shard_size=shard_size)
    return plain


def _loaded(directory) -> tuple[torch.dtype, dict[str, torch.Tensor]] | None:
    """``(config dtype, weights)`` of ``directory`` loaded by transformers; None when it refuses."""
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
    except Exception:  # (no config.json, no weights: any refusal is a safe outcome)
        return None
    return model.config.dtype, {k: v.clone() for k, v in model.state_dict().items()}


def _same(loaded, reference) -> bool:
    dtype, weights = loaded
    return (
        dtype == reference[0]
        and weights.keys() == reference[1].keys()
        and all(
            weights[k].dtype == reference[1][k].dtype and torch.equal(weights[k], reference[1][k])
            for k in weights
        )
    )


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    """Two different merges, each saved whole once as the reference: "a" float32 in one file,
    "b" another adapter in bfloat16, sharded."""
    root = tmp_path_factory.mktemp("references")
    tokenizer = tiny_tokenizer.build()
    models = {
        "a": _merged(seed=11, dtype=torch.float32),
        "b": _merged(seed=12, dtype=torch.bfloat16, shard_size="60KB"),
    }
    references = {}
    for name, model in models.items():
        save_merged_model(model, root / name, tokenizer=tokenizer)
        references[name] = _loaded(root / name)
    assert (root / "b" / "model.safetensors.index.json").is_file()  # (b really is sharded)
    assert references["a"][0] == torch.float32 and references["b"][0] == torch.bfloat16
    assert not _same(references["a"], references["b"])
    return models, references, root, tokenizer


def _crash_states(merges, tmp_path, monkeypatch, old: str | None, new: str):
    """For each k: the output directory (holding merge ``old``, or nothing) after a save of
    ``new`` killed after its k-th file system step; yields ``(k, directory)``, and then checks
    that a later save completes ``new`` and removes the killed save's staging folder."""
    models, references, root, tokenizer = merges
    output = tmp_path / "merged"

    def fresh_start() -> None:
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        if old is not None:
            shutil.copytree(root / old, output)
            (output / "notes.txt").write_text("the user's notes")

    fresh_start()
    counter = _KillAfter(k=0)  # (never kills: counts the steps of a whole save)
    with monkeypatch.context() as patch:
        counter.install(patch)
        save_merged_model(models[new], output, tokenizer=tokenizer)
    assert _same(_loaded(output), references[new])
    assert counter.calls >= 10
    for k in range(1, counter.calls + 1):
        fresh_start()
        with monkeypatch.context() as patch, pytest.raises(_Killed):
            _KillAfter(k).install(patch)
            save_merged_model(models[new], output, tokenizer=tokenizer)
        yield k, output
        if old is not None:
            assert (output / "notes.txt").read_text() == "the user's notes", k
        # The killed save's staging folder is left (a SIGKILL runs no clean-up). Once it is a
        # minute old, the next save beside the output removes it and completes the new merge.
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
        old_time = time.time() - STALE_AFTER_S - 5
        for leftover in leftovers:
            for path in [leftover, *leftover.iterdir()]:
                os.utime(path, (old_time, old_time))
        save_merged_model(models[new], output, tokenizer=tokenizer)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], k
        assert _same(_loaded(output), references[new]), k


@pytest.mark.slow
@pytest.mark.parametrize(("old", "new"), [("a", "b"), ("b", "a")])
def test_a_killed_merge_into_an_existing_output_never_leaves_a_mix_that_loads(
    merges, tmp_path, monkeypatch, old, new
) -> None:
    """Merging again into an earlier merge's directory (allowed), killed at any step: the
    directory loads exactly the old merge (weights and config dtype), exactly the new one, or
    not at all. ("a" -> "b": new shards beside the old model.safetensors, which transformers
    would prefer; "b" -> "a": the reverse.)"""
    references = merges[1]
    outcomes = []
    for k, output in _crash_states(merges, tmp_path, monkeypatch, old, new):
        loaded = _loaded(output)
        if loaded is None:
            outcomes.append("refused")
        elif _same(loaded, references[old]):
            outcomes.append("old")
        else:
            assert _same(loaded, references[new]), f"killed after step {k}: a mix loads"
            outcomes.append("new")
    # Killed early the old merge stays, killed at the very end the new one is whole.
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "refused" in outcomes


@pytest.mark.slow
def test_a_killed_merge_into_a_new_output_never_leaves_a_directory_that_loads_half(
    merges, tmp_path, monkeypatch
) -> None:
    references = merges[1]
    outcomes = []
    for k, output in _crash_states(merges, tmp_path, monkeypatch, None, "b"):
        loaded = _loaded(output)
        assert loaded is None or _same(loaded, references["b"]), f"killed after step {k}"
        outcomes.append("refused" if loaded is None else "new")
    assert outcomes[0] == "refused" and outcomes[-1] == "new"


def test_a_young_staging_folder_and_the_users_folders_are_left_alone(merges, tmp_path) -> None:
    """A staging folder touched within the last minute may be another save's, still writing:
    it stays; so does a folder of the user's beside the output, however old."""
    models, _, _, _ = merges
    live = tmp_path / ".merged.abcd1234.tmp"  # (as tempfile.mkdtemp names staging folders)
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    old_time = time.time() - STALE_AFTER_S - 5
    os.utime(live, (old_time, old_time))  # (the folder is old, the file in it is being written)
    users = tmp_path / ".merged.backup"
    users.mkdir()
    (users / "config.json").write_text("{}")
    for path in (users, users / "config.json"):
        os.utime(path, (old_time, old_time))
    save_merged_model(models["a"], tmp_path / "merged")
    assert (live / "model.safetensors").read_bytes() == b"being written"
    assert (users / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".merged.abcd1234.tmp",
        ".merged.backup",
        "merged",
    ]
