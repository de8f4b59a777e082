"""The command-line faults a review found, each checked through ``lorakit ...`` on tiny models:
outputs that destroyed files (a user's files beside a merged model, the commands' own inputs, a
model directory), a demo rerun's stale results, a full disk's traceback, and messages that were
wrong or missing (flags accepted and ignored among them)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

import lorakit
import lorakit.commands.eval
from lorakit.cli import main
from lorakit.models import load_model
from tests import tiny_models
from tests.cli_runs import demo_settings


def _error(capsys, *argv, code: int = 2) -> str:
    """Run ``lorakit ARGV``; its exit code must be ``code`` and stderr one line, returned."""
    result = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert result == code and err.count("\n") == 1, (result, err)
    return err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir):
    """``(q_v, all_linear)``: two adapters of the tiny Llama; the second, r 8 on every
    projection, is about 60 KB."""
    root = tmp_path_factory.mktemp("review_adapters")
    made = []
    for name, config in (
        ("q_v", lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
        ("all_linear", lorakit.LoraConfig(r=8, target_modules="all-linear")),
    ):
        model, _ = load_model(model_dir, progress=False)
        lorakit.inject(model, config)
        tiny_models.randomize_adapters(model, std=0.2)
        made.append(lorakit.save_adapter(model, root / name))
    return tuple(made)


@pytest.fixture
def no_loading(monkeypatch):
    """A command that loads a model fails the test: its refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(lorakit.commands.eval, "load_model_and_adapter", refuse)


# 1. merge into an existing directory removes only transformers' weight files


def test_merge_into_an_existing_directory_keeps_the_users_files(
    tmp_path, capsys, model_dir, adapters
):
    output = tmp_path / "existing"
    output.mkdir()
    mine = ["model_backup_v1.safetensors", "pytorch_model_training_notes.txt", "notes.txt"]
    mine += ["model-1-of-2.safetensors", "pytorch_model-00001-of-00002.bin.bak"]
    stale = ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    stale += ["pytorch_model.bin", "pytorch_model-00002-of-00002.bin"]
    for name in mine + stale:
        (output / name).write_text("keep")
    argv = ["merge", "--model", model_dir, "--adapter", adapters[0], "--output", output]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    left = {path.name for path in output.iterdir()}
    assert set(mine) <= left and not set(stale) & left  # an earlier save's weights are gone
    assert all((output / name).read_text() == "keep" for name in mine)
    assert "model.safetensors" in left


# 2. outputs that are the command's own inputs


def test_merge_refuses_to_write_over_its_model_or_adapter(
    tmp_path, capsys, model_dir, adapters, no_loading
):
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    weights = _digest(base / "model.safetensors")
    err = _error(capsys, "merge", "--model", base, "--adapter", adapters[0], "--output", base)
    assert f"merge: --output {base} is --model {base}" in err and "another --output" in err
    via_link = tmp_path / "link"
    via_link.symlink_to(base)
    err = _error(capsys, "merge", "--model", base, "--adapter", adapters[0], "--output", via_link)
    assert "is --model" in err
    assert _digest(base / "model.safetensors") == weights
    output = adapters[0]  # (refused by the save, after loading, before)
    err = _error(capsys, "merge", "--model", base, "--adapter", output, "--output", output)
    assert f"{output} holds an adapter (adapter_config.json)" in err


def test_combine_refuses_to_write_over_an_input_adapter(tmp_path, capsys, adapters):
    first = tmp_path / "first"
    shutil.copytree(adapters[0], first)
    before = _digest(first / "adapter_model.safetensors")
    arguments = [first, adapters[1], "--method", "svd", "--rank", "2"]
    err = _error(capsys, "combine", *arguments, "--output", first)
    assert f"combine: --output {first} is input adapter {first}" in err
    err = _error(
        capsys, "combine", *arguments, "--output", tmp_path / ".." / tmp_path.name / "first"
    )
    assert "is input adapter" in err
    assert _digest(first / "adapter_model.safetensors") == before
    nested = tmp_path / "peft_layout"  # PEFT's DIR/default/, read from DIR
    shutil.copytree(adapters[0], nested / "default")
    err = _error(capsys, "combine", nested, adapters[1], "--output", nested / "default")
    assert f"is input adapter {nested}" in err


def test_export_refuses_to_write_over_its_gguf_adapter(tmp_path, capsys, model_dir, no_loading):
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF")
    argv = ["export", model_dir, "--adapter", adapter, "--format", "gguf", "--output", adapter]
    assert f"is --adapter {adapter}" in _error(capsys, *argv)
    assert adapter.read_bytes() == b"GGUF"


# 3. combine into a model directory


def test_combine_refuses_a_model_directory_as_its_output(tmp_path, capsys, model_dir, adapters):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    before = sorted(path.name for path in copy.iterdir())
    err = _error(capsys, "combine", *adapters, "--output", copy)
    assert f"combine: --output {copy} is a model directory; write the adapter into its own" in err
    assert sorted(path.name for path in copy.iterdir()) == before


# 4. a demo rerun removes the earlier demo's results before it trains


def test_an_interrupted_demo_rerun_leaves_no_earlier_results(tmp_path, monkeypatch, model_dir):
    import lorakit.demo

    output = tmp_path / "demo"
    output.mkdir()
    (output / lorakit.demo.DEMO_MARKER).write_text("an earlier demo\n")
    for name in ("summary.json", "summary.txt", "predictions.jsonl"):
        (output / name).write_text("{}\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.demo, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lorakit.demo.run_demo(demo_settings(output, model_dir))
    assert sorted(path.name for path in output.iterdir()) == [lorakit.demo.DEMO_MARKER]


# 5. a full disk or a file-size limit: one line naming --output, no empty directory left


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))


@pytest.mark.slow  # (a subprocess)
def test_a_file_size_limit_is_one_line_and_leaves_no_directory(tmp_path, adapters):
    """``ulimit -f`` makes the write fail with EFBIG (Python ignores SIGXFSZ): the ~60 KB
    adapter cannot be written under a 20 KB limit."""
    output = tmp_path / "combined"
    source = Path(lorakit.__file__).parents[1]
    environment = os.environ | {"PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "combine", str(adapters[1]), "--output", str(output)],
        capture_output=True,
        text=True,
        env=environment,
        preexec_fn=_limit_file_size,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith(("lorakit", "Trace"))]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith(f"lorakit: error: cannot write the output (--output {output}: ")
    assert errors[0].endswith("and run again") and "free space" in errors[0]
    assert not output.exists()


def test_a_full_disk_while_extracting_leaves_no_empty_directory(tmp_path, capsys, monkeypatch):
    from lorakit.io import atomic

    base, tuned = tiny_models.llama(), tiny_models.fine_tuned(tiny_models.llama(), noise=0.0)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    capsys.readouterr()  # (the saving bars)

    def full(files):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_files", full)
    output = tmp_path / "new" / "adapter"
    (tmp_path / "new").mkdir()
    argv = ["extract", "--base", tmp_path / "base", "--finetuned", tmp_path / "tuned"]
    err = _error(capsys, *argv, "--rank", "2", "--output", output)
    assert err == (
        f"lorakit: error: cannot save the adapter in {output}: No space left on device; free "
        "space on its disk and save again\n"
    )
    assert list((tmp_path / "new").iterdir()) == []


def test_safetensors_and_short_write_failures_are_one_line(
    tmp_path, capsys, monkeypatch, model_dir, adapters
):
    import lorakit.io
    from lorakit.export import gguf_model

    def safetensors_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(lorakit.io, "save_merged_model", safetensors_full)
    output = tmp_path / "merged"
    err = _error(
        capsys, "merge", "--model", model_dir, "--adapter", adapters[0], "--output", output, code=1
    )
    assert f"cannot write the output (--output {output}: File too large (os error 27))" in err

    def short_write(*args, **kwargs):
        raise OSError("4096 requested and 3176 written")  # numpy's tofile, in gguf's writer

    monkeypatch.setattr(gguf_model, "export_model", short_write)
    output = tmp_path / "model.gguf"
    err = _error(capsys, "export", model_dir, "--format", "gguf", "--output", output, code=1)
    assert f"(--output {output}: short write, 3176 of 4096 bytes)" in err


# 6. messages


def test_extract_says_the_models_differ_when_no_layer_has_the_same_shape(tmp_path, capsys):
    tiny_models.llama().save_pretrained(tmp_path / "base")
    wide = tiny_models.LlamaForCausalLM(tiny_models.llama_config(hidden_size=128))
    wide.save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    argv = ["--base", tmp_path / "base", "--finetuned", tmp_path / "wide"]
    err = _error(capsys, "extract", *argv, "--rank", "2", "--output", tmp_path / "out")
    assert "extract: layer 'model.layers.0.self_attn.q_proj' has shape (64, 64) in the base" in err
    assert "they are not the same model" in err and not (tmp_path / "out").exists()


def test_analyze_and_extract_say_two_architectures_are_different_models(tmp_path, capsys):
    tiny_models.llama().save_pretrained(tmp_path / "llama")
    tiny_models.gpt2().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    argv = ["--base", tmp_path / "llama", "--finetuned", tmp_path / "gpt2"]
    for command in (["analyze"], ["extract", "--rank", "2", "--output", tmp_path / "out"]):
        err = _error(capsys, *command, *argv)
        assert "share no linear layer name" in err and "they are different models" in err


def test_export_names_a_file_in_the_way_before_loading(tmp_path, capsys, model_dir, no_loading):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    output = blocker / "x.gguf"
    err = _error(capsys, "export", model_dir, "--format", "gguf", "--output", output)
    assert f"--output {output}: {blocker} is a file, not a directory" in err


@pytest.mark.parametrize(
    ("method", "flag", "value"),
    [
        ("svd", "--majority-sign", "frequency"),
        ("cat", "--majority-sign", "total"),
        ("dare_linear", "--majority-sign", "frequency"),
        ("svd", "--seed", "7"),
        ("ties", "--seed", "7"),
    ],
)
def test_combine_refuses_options_its_method_ignores(
    tmp_path, capsys, adapters, method, flag, value
):
    extra = ["--density", "0.5"] if method in ("ties", "dare_linear") else []
    output = tmp_path / "never"
    argv = ["combine", *adapters, "--method", method, *extra, flag, value, "--output", output]
    assert f"combine: {flag} is for" in _error(capsys, *argv)
    assert not output.exists()


def test_combine_still_takes_the_options_where_they_act(tmp_path, capsys, adapters):
    output = tmp_path / "dare"
    argv = ["combine", *adapters, "--method", "dare_ties", "--density", "0.5"]
    argv += ["--majority-sign", "frequency", "--seed", "7", "--output", output, "--json"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["majority_sign_method"] == "frequency" and report["seed"] == 7


def test_export_refuses_flags_that_do_nothing_for_its_source(
    tmp_path, capsys, model_dir, adapters, no_loading
):
    output = tmp_path / "x.gguf"
    adapter_source = ["export", adapters[0], "--model", model_dir, "--format", "gguf"]
    err = _error(capsys, *adapter_source, "--allow-base-mismatch", "--output", output)
    assert "--allow-base-mismatch goes with a model SOURCE and --adapter" in err
    model_source = ["export", model_dir, "--format", "gguf", "--output", output]
    err = _error(capsys, *model_source, "--model", model_dir)
    assert "--model goes with an adapter SOURCE" in err
    err = _error(capsys, *model_source, "--allow-base-mismatch")
    assert "--allow-base-mismatch goes with --adapter" in err
    assert not output.exists()


# the cheap ones


def test_demo_refuses_an_infinite_learning_rate_before_the_model_loads(capsys, monkeypatch):
    import lorakit.demo

    monkeypatch.setattr(lorakit.demo, "run_demo", lambda settings: pytest.fail("it ran"))
    for value in ("inf", "nan"):
        assert f"--lr must be a finite number > 0, got {value}" in _error(
            capsys, "demo", "--lr", value
        )


def test_an_unwritable_output_is_named_not_its_temporary_file(
    tmp_path, capsys, monkeypatch, adapters
):
    from lorakit.io import atomic

    def refused(directory, prefix):
        raise PermissionError(errno.EACCES, "Permission denied", f"{directory}/{prefix}9f3a.tmp")

    monkeypatch.setattr(atomic, "_create_new_file", refused)
    output = tmp_path / "combined"
    err = _error(capsys, "combine", adapters[0], "--output", output, code=1)
    assert err == (
        f"lorakit: error: Permission denied: --output {output}; check the permissions, or "
        "choose another path\n"
    )
    assert not output.exists()  # created by the run, left empty: removed


def test_an_unknown_option_points_to_the_commands_help(capsys, adapters):
    err = _error(capsys, "inspect", adapters[0], "--bogus")
    assert err == (
        "lorakit: error: inspect: unrecognized arguments: --bogus (see 'lorakit inspect --help')\n"
    )
    assert "(see 'lorakit --help')" in _error(capsys, "--bogus")
