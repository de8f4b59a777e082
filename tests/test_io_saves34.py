"""Saving adapters and merged models where saves go wrong (session 34's review): a PeftModel
wrapper with no adapters left, an output that is a mount point, a crash or Ctrl-C between the
renames, two processes saving one directory, and the errors a refusing file system gives.

Failures are injected at a chosen step (``os.replace`` patched), never left to timing."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.errors import UserError
from lorakit.io import atomic, merged, save_adapter, save_errors, save_lock, save_merged_model
from lorakit.models import load_model
from tests import tiny_models

_IDS = tiny_models.input_ids()
_TARGETS = ["q_proj", "v_proj"]


def _adapted(alpha: float = 8, seed: int = 3) -> torch.nn.Module:
    """The tiny Llama with a random LoRA (r 4, ``lora_alpha`` alpha) on q and v."""
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=_TARGETS)
    )
    tiny_models.randomize_adapters(model, seed=seed, std=0.3)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_IDS).logits


def _reloaded_logits(directory: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(directory))


def _peft_logits(directory: Path) -> torch.Tensor:
    return _logits(peft.PeftModel.from_pretrained(tiny_models.llama(), directory))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# 1. save_merged_model given lorakit's PeftModel with no adapters left


def test_a_peft_model_saves_its_merged_model_again_and_after_merge_and_unload(tmp_path) -> None:
    """The wrapper's own save_pretrained writes adapters (none once merged): the model inside it
    is saved, so a second save, or one after ``pm.merge_and_unload()``, writes the merged model
    and never empties the output (it removed the old weights and returned normally)."""
    config = lorakit.LoraConfig(r=4, lora_alpha=32, target_modules=_TARGETS)
    wrapper = lorakit.get_peft_model(tiny_models.llama(), config)
    tiny_models.randomize_adapters(wrapper, std=0.3)
    expected = _logits(wrapper)
    first = save_merged_model(wrapper, tmp_path / "first")
    second = save_merged_model(wrapper, tmp_path / "second")
    assert not isinstance(second, lorakit.PeftModel) and first is second
    for name in ("first", "second"):
        torch.testing.assert_close(_reloaded_logits(tmp_path / name), expected)

    save_merged_model(_adapted(alpha=8), tmp_path / "out")  # an older merge in the output
    wrapper = lorakit.get_peft_model(tiny_models.llama(), config)
    tiny_models.randomize_adapters(wrapper, seed=5, std=0.3)
    expected = _logits(wrapper)
    wrapper.merge_and_unload()
    save_merged_model(wrapper, tmp_path / "out")
    assert {"config.json", "model.safetensors"} <= set(_files(tmp_path / "out"))
    torch.testing.assert_close(_reloaded_logits(tmp_path / "out"), expected)


def test_a_save_pretrained_that_stages_no_model_is_refused_with_the_output_untouched(
    tmp_path,
) -> None:
    save_merged_model(_adapted(), tmp_path / "out")
    before = _files(tmp_path / "out")
    model = _adapted(seed=4)
    model.save_pretrained = lambda directory: (Path(directory) / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"wrote \['config.json'\], not a transformers model"):
        save_merged_model(model, tmp_path / "out")
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(before)


# 2. an output on another file system than its parent (a Docker volume, a link to another disk)


def _other_file_system(monkeypatch, volume: Path) -> None:
    """``os.replace`` from outside the (resolved) ``volume`` into it fails with EXDEV, as
    between two file systems."""
    real, inside = os.replace, str(volume.resolve()) + os.sep

    def replace(source, destination):
        into = str(Path(destination).resolve()).startswith(inside)
        if into != str(Path(source).resolve()).startswith(inside):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), source, None, destination)
        return real(source, destination)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("through_a_link", [False, True])
def test_a_merged_save_into_a_mount_point_stages_on_its_file_system(
    tmp_path, monkeypatch, through_a_link
) -> None:
    volume = tmp_path / "volume"
    save_merged_model(_adapted(alpha=8), volume)  # the old model in it
    output = volume
    if through_a_link:
        output = tmp_path / "link"
        output.symlink_to(volume)
    new = _adapted(alpha=32, seed=7)
    expected = _logits(new)
    _other_file_system(monkeypatch, volume)
    save_merged_model(new, output)
    monkeypatch.undo()
    torch.testing.assert_close(_reloaded_logits(volume), expected)
    assert sorted(p.name for p in volume.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]  # no staging folder, no lock file left


def test_an_error_while_moving_in_leaves_the_old_merged_model_whole(tmp_path, monkeypatch):
    """Each ``os.replace`` of the move-in fails in turn (an I/O error): the moves made are
    undone, the old model reloads exactly, and the error names the output."""
    output = tmp_path / "out"
    old = _adapted(alpha=8)
    expected = _logits(old)
    save_merged_model(old, output)
    real, calls = os.replace, []
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(b) or real(a, b))
    save_merged_model(_adapted(alpha=8), output)  # the same model again: counts the renames
    monkeypatch.undo()
    assert len(calls) >= 3  # (now 6: the 3 old files out, the 3 new ones in)
    before = _files(output)
    for failing in range(len(calls)):
        made = []

        def replace(source, destination, failing=failing, made=made):
            made.append(destination)
            if len(made) == failing + 1:  # (this one call; the undoing ones go through)
                raise OSError(errno.EIO, "Input/output error", source, None, destination)
            return real(source, destination)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(UserError, match=re.escape(f"cannot save the merged model in {output}")):
            save_merged_model(_adapted(alpha=32, seed=9), output)
        monkeypatch.undo()
        assert _files(output) == before, failing
        assert sorted(p.name for p in output.iterdir()) == sorted(before), failing
    torch.testing.assert_close(_reloaded_logits(output), expected)


def test_a_killed_merged_saves_staging_inside_the_output_is_removed_once_stale(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    stale, live = output / ".lorakit-staging.abcd1234.tmp", output / ".lorakit-staging.live1234.tmp"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"a killed save's copy")
    old_time = time.time() - atomic.STALE_AFTER_S - 5
    for path in (stale, stale / "model.safetensors"):
        os.utime(path, (old_time, old_time))
    save_merged_model(_adapted(), output)
    assert not stale.exists() and (live / "model.safetensors").exists()


# 3. the renames of an adapter save: the old config out first, Ctrl-C held back


class _Killed(BaseException):
    """A simulated SIGKILL: raised after the step it interrupts, and by every later step."""


def _kill_after_renaming(monkeypatch, name: str) -> None:
    """The process dies right after ``os.replace`` put ``name`` in place: that rename is done,
    nothing after it (no clean-up either)."""
    real_replace, real_unlink, dead = os.replace, os.unlink, []

    def replace(source, destination):
        if dead:
            raise _Killed
        real_replace(source, destination)
        if Path(destination).name == name:
            dead.append(True)
            raise _Killed

    def unlink(path, *args, **kwargs):
        if dead:
            raise _Killed
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)


def test_a_crash_between_the_renames_leaves_no_config_that_peft_would_pair(
    tmp_path, monkeypatch
) -> None:
    """Killed after the new weights are in: the old ``adapter_config.json`` is already out, so
    PEFT refuses the directory instead of loading the new weights with the old alpha (0.0268
    off in the review); the next save completes it and removes the old config's copy once
    stale."""
    save_adapter(_adapted(alpha=8), tmp_path)
    new = _adapted(alpha=32, seed=5)
    expected = _logits(new)
    _kill_after_renaming(monkeypatch, "adapter_model.safetensors")
    with pytest.raises(_Killed):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises((ValueError, OSError)):
        _peft_logits(tmp_path)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter_config.json.")]
    alphas = sorted(json.loads(path.read_text())["lora_alpha"] for path in left)
    assert alphas == [8, 32]  # the old config taken out, the new one staged
    old_time = time.time() - atomic.STALE_AFTER_S - 5
    for path in tmp_path.glob(".*.tmp"):  # (and the old weights kept to put back on an error)
        os.utime(path, (old_time, old_time))
    save_adapter(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    torch.testing.assert_close(_peft_logits(tmp_path), expected)


def test_ctrl_c_during_the_renames_waits_until_both_files_are_in(tmp_path, monkeypatch) -> None:
    """SIGINT arriving as the weights are renamed in is held back until the config follows:
    the save completes whole, then KeyboardInterrupt is raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored when the
    try:  # tests run in a background job, as CI may run them)
        _save_interrupted_by_ctrl_c(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_interrupted_by_ctrl_c(tmp_path, monkeypatch) -> None:
    save_adapter(_adapted(alpha=8), tmp_path)
    new = _adapted(alpha=32, seed=5)
    expected = _logits(new)
    real = os.replace

    def replace(source, destination):
        if Path(destination).name == "adapter_model.safetensors":
            signal.raise_signal(signal.SIGINT)
        return real(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 32
    torch.testing.assert_close(_peft_logits(tmp_path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("failing", ["adapter_model.safetensors", "config_is_a_directory"])
def test_an_error_renaming_the_weights_keeps_the_old_adapter(tmp_path, monkeypatch, failing):
    """The weights' rename fails (an I/O error; or ``adapter_config.json`` is a directory, so
    that taking it out fails): the old pair stays as it was, and the error names the output."""
    if failing == "config_is_a_directory":
        (tmp_path / "adapter_model.safetensors").write_bytes(b"the old weights")
        (tmp_path / "adapter_config.json").mkdir()
        match = "Is a directory: .*adapter_config.json"
    else:
        save_adapter(_adapted(alpha=8), tmp_path)
        real = os.replace

        def replace(source, destination):
            if Path(destination).name == failing:
                raise OSError(errno.EIO, "Input/output error", source, None, destination)
            return real(source, destination)

        monkeypatch.setattr(os, "replace", replace)
        match = "Input/output error"
    before = _files(tmp_path)
    expected = f"cannot save the adapter in {re.escape(str(tmp_path))}: {match}"
    with pytest.raises(UserError, match=expected):
        save_adapter(_adapted(alpha=32, seed=5), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", *before}


# 4. two saves into one directory take turns


def test_two_saves_into_one_directory_take_turns_and_the_last_wins_whole(tmp_path, monkeypatch):
    """A saver paused in the middle of its renames holds the directory's lock: a second save
    waits for it, then replaces the pair whole (before, it wrote its pair in between, and the
    first saver's config followed: one save's weights beside the other's config)."""
    first, second = _adapted(alpha=8, seed=1), _adapted(alpha=32, seed=2)
    expected = _logits(second)
    paused, resume, real = threading.Event(), threading.Event(), os.replace

    def replace(source, destination):
        result = real(source, destination)
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()  # (after its first rename, lock held)
            resume.wait(timeout=60)
        return result

    monkeypatch.setattr(os, "replace", replace)
    errors = []

    def save(model) -> None:
        try:
            save_adapter(model, tmp_path)
        except BaseException as error:  # (reported below)
            errors.append(error)

    one = threading.Thread(target=save, args=(first,), name="first")
    one.start()
    assert paused.wait(timeout=60)
    two = threading.Thread(target=save, args=(second,), name="second")
    two.start()
    two.join(timeout=2.0)
    assert two.is_alive()  # waiting for the lock
    resume.set()
    one.join(timeout=60)
    two.join(timeout=60)
    monkeypatch.undo()
    assert not errors and not one.is_alive() and not two.is_alive()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 32
    torch.testing.assert_close(_peft_logits(tmp_path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_a_file_system_without_flock_saves_unlocked(tmp_path, monkeypatch) -> None:
    import fcntl

    tried = []

    def no_locks(fd, operation):
        tried.append(operation)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with save_lock.directory_locked(tmp_path) as held:
        assert held is False
    assert tried == [fcntl.LOCK_EX]
    save_adapter(_adapted(alpha=8), tmp_path)
    assert tried == [fcntl.LOCK_EX] * 2  # (the save asked for the lock, and went on without)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


# 5. errors of the Python API: checked first, then named by the output directory


def test_an_output_that_is_a_file_is_refused_before_anything_is_done(tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    model = _adapted()
    for save in (save_adapter, save_merged_model):
        for output in (tmp_path / "afile", tmp_path / "afile" / "sub"):
            with pytest.raises(UserError, match="give a directory") as error:
                save(model, output)
            assert isinstance(error.value, UserError) and isinstance(error.value, OSError)
            what = "the merged model" if save is save_merged_model else "the adapter"
            assert str(error.value).startswith(f"cannot save {what} in {output}")
    assert lorakit.adapter_configs(model)  # not merged: the merge waits for the check
    assert (tmp_path / "afile").read_text() == "x"
    with pytest.raises(UserError, match="it is a broken symbolic link"):
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        save_adapter(model, tmp_path / "dangling")


def test_a_read_only_output_is_refused_before_the_merge(tmp_path, monkeypatch) -> None:
    model = _adapted()
    monkeypatch.setattr(save_errors.os, "access", lambda path, mode: False)
    monkeypatch.setattr(save_errors, "_read_only", lambda directory: True)
    with pytest.raises(UserError) as error:
        save_merged_model(model, tmp_path / "out")
    assert error.value.errno == errno.EROFS
    assert str(error.value) == (
        f"cannot save the merged model in {tmp_path / 'out'}: Read-only file system: {tmp_path}; "
        "its file system is read-only: save to another directory"
    )
    assert lorakit.adapter_configs(model) and not (tmp_path / "out").exists()


def test_a_full_disk_is_named_by_the_output_and_keeps_the_errno(tmp_path, monkeypatch) -> None:
    """An adapter save: the error names the directory, not a temporary file, and stays the
    OSError it was (what ``lorakit train``'s checkpoint handling reads). A merged save whose
    ``save_pretrained`` hits a full disk (safetensors' own error) leaves no output behind."""

    def full(target, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    save_adapter(_adapted(alpha=8), tmp_path / "ad")
    before = _files(tmp_path / "ad")
    monkeypatch.setattr(atomic, "_write_temporary", full)
    with pytest.raises(OSError) as error:
        save_adapter(_adapted(alpha=32), tmp_path / "ad")
    assert isinstance(error.value, UserError)
    assert (error.value.errno, error.value.strerror) == (errno.ENOSPC, "No space left on device")
    assert str(error.value) == (
        f"cannot save the adapter in {tmp_path / 'ad'}: No space left on device; free space on "
        "its disk and save again"
    )
    assert _files(tmp_path / "ad") == before

    from safetensors import SafetensorError

    def safetensors_full(directory, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    model = _adapted()
    model.save_pretrained = safetensors_full
    with pytest.raises(UserError) as error:
        save_merged_model(model, tmp_path / "merged")
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(
        f"cannot save the merged model in {tmp_path / 'merged'}: No space left on device; free"
    )
    assert not (tmp_path / "merged").exists()  # (the directory the save made is gone again)


def test_the_merge_command_reports_a_failed_save_in_one_line(
    tmp_path, capsys, monkeypatch, model_dir
) -> None:
    from lorakit.cli import main

    model, _ = load_model(model_dir, progress=False)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=_TARGETS))
    adapter = save_adapter(model, tmp_path / "adapter")

    def full(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merged.atomic, "new_file_mode", full)
    output = tmp_path / "merged"
    capsys.readouterr()
    code = main(
        ["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(output)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err == (
        f"lorakit: error: cannot save the merged model in {output}: No space left on device; "
        "free space on its disk and save again\n"
    )
    assert not output.exists()
    monkeypatch.undo()
    assert (
        main(
            ["merge", "--model", str(model_dir), "--adapter", str(adapter), "--output", str(output)]
        )
        == 0
    )
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []
