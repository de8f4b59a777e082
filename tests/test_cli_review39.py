"""The command line's review-39 defects: an empty ``--output`` / ``--adapter`` refused in one
line (never the current directory), ``eval`` following the prompt style an adapter records,
``train --style`` choices, one ``lorakit: warning:`` line for a library warning during
training, ``serve --adapters`` given a file or one adapter's own directory, a checkpoint save
or prune interrupted by Ctrl-C leaving no temporary directory, and the refusal of a run that
wrote no checkpoint naming the way that works."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorakit.train import checkpoint, checkpoint_dirs
from tests.cli_runs import run_cli, train_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("--steps", "1", "--batch-size", "4", "--r", "2", "--target-modules", "q_proj,v_proj")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir, jsonl):
    """An adapter ``lorakit train`` trained on prompt/completion data (it records "plain")."""
    output = tmp_path_factory.mktemp("run")
    assert train_cli(model_dir, jsonl, output, *TINY, "--lr", "1e-2") == 0
    return output / "adapter"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, model_dir):
    """``model_dir``'s model with its q_proj weights moved: a full fine-tune for extract."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("finetuned")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_proj" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    return directory


def _one_error_line(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2 and out == "", (code, out, err)
    assert err.splitlines() == [f"lorakit: error: {expected}"], err


# 1. --output "" / "   ": refused by every command that writes, nothing written in the cwd


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_output_is_refused_and_the_cwd_stays_empty(
    blank, tmp_path, monkeypatch, capsys, model_dir, jsonl, adapter, finetuned
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    commands = {
        "--output is empty; give a directory for the run (default: lorakit-run)": [
            "train",
            "--model",
            model_dir,
            "--data",
            jsonl,
            *TINY,
            "--no-progress",
        ],
        "combine: --output is empty; give a directory for the combined adapter": [
            "combine",
            adapter,
        ],
        "extract: --output is empty; give a directory for the adapter": [
            "extract",
            "--base",
            model_dir,
            "--finetuned",
            finetuned,
            "--rank",
            "2",
        ],
        "--output is empty; give a directory for the merged model": [
            "merge",
            "--model",
            model_dir,
            "--adapter",
            adapter,
        ],
        "--output is empty; give the .gguf file to write": [
            "export",
            adapter,
            "--format",
            "gguf",
            "--model",
            model_dir,
        ],
    }
    for expected, argv in commands.items():
        _one_error_line(*run_cli(capsys, *argv, "--output", blank), expected)
        assert sorted(os.listdir(cwd)) == []


def test_empty_output_in_a_config_file_is_refused(tmp_path, monkeypatch, capsys, model_dir, jsonl):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {jsonl}\noutput: ''\nsteps: 1\n")
    code, out, err = run_cli(capsys, "train", "--config", config, "--no-progress")
    _one_error_line(
        code, out, err, "--output is empty; give a directory for the run (default: lorakit-run)"
    )
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]


# 2. --adapter "": refused in one CLI line, never the base model alone


def test_empty_adapter_is_refused_everywhere(tmp_path, capsys, model_dir, jsonl, adapter):
    base_alone = "--adapter is empty; give an adapter directory, or leave --adapter out for the "
    commands = [
        (f"{base_alone}base model alone", ["eval", "--model", model_dir, "--data", jsonl]),
        (f"{base_alone}base model alone", ["generate", "hi", "--model", model_dir]),
        (
            "--adapter is empty; give the adapter directory to merge",
            ["merge", "--model", model_dir, "--output", tmp_path / "merged"],
        ),
        (
            "--adapter is empty; give the adapter directory to merge in, or leave --adapter out",
            ["export", model_dir, "--format", "gguf", "--output", tmp_path / "m.gguf"],
        ),
    ]
    for expected, argv in commands:
        _one_error_line(*run_cli(capsys, *argv, "--adapter", ""), expected)
    expected = "combine: an input adapter is empty; give each adapter's directory"
    argv = ["combine", adapter, " ", "--output", tmp_path / "combined"]
    _one_error_line(*run_cli(capsys, *argv), expected)
    assert sorted(os.listdir(tmp_path)) == []


# 3. eval follows the adapter's recorded prompt style, as generate does


def _eval(capsys, *argv) -> dict:
    code, out, err = run_cli(capsys, "eval", *argv, "--limit", "6", "--max-length", "512")
    assert code == 0, err
    return json.loads(out)


def test_eval_scores_builtin_data_in_the_recorded_plain_style(capsys, model_dir, adapter):
    """``adapter`` records "plain": rotten-tomatoes (chat by default) is scored in the plain
    form, the numbers of an explicit ``--style plain`` run, not of ``--style chat``."""
    from lorakit.io.read import read_adapter_header
    from lorakit.io.save import recorded_prompt_style

    assert recorded_prompt_style(read_adapter_header(adapter).metadata) == "plain"
    argv = ("--model", model_dir, "--adapter", adapter, "--data", "rotten-tomatoes")
    default, plain = _eval(capsys, *argv), _eval(capsys, *argv, "--style", "plain")
    chat = _eval(capsys, *argv, "--style", "chat")
    assert default == plain
    assert default["loss"] != pytest.approx(chat["loss"], rel=1e-6)


def test_eval_scores_csv_data_in_the_recorded_chat_style(capsys, tmp_path, model_dir):
    """An adapter trained on CSV data with ``--style chat`` (CSV's default is plain) is
    evaluated on that CSV through the chat template, as ``--style chat`` scores it."""
    data = tmp_path / "reviews.csv"
    rows = [("a warm funny film", "positive"), ("a dull mess", "negative")] * 4
    data.write_text("text,label\n" + "".join(f"{t},{w}\n" for t, w in rows))
    output = tmp_path / "run"
    assert train_cli(model_dir, data, output, *TINY, "--lr", "1e-2", "--style", "chat") == 0
    capsys.readouterr()
    argv = ("--model", model_dir, "--adapter", output / "adapter", "--data", data)
    default, chat = _eval(capsys, *argv), _eval(capsys, *argv, "--style", "chat")
    plain = _eval(capsys, *argv, "--style", "plain")
    assert default == chat
    assert default["loss"] != pytest.approx(plain["loss"], rel=1e-6)


def test_eval_help_states_the_style_default(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "eval", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the form --adapter was trained on" in text


# 4. train --style: chat or plain only


def test_train_style_takes_only_chat_or_plain(tmp_path, capsys, model_dir, jsonl):
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", tmp_path / "o"]
    code, out, err = run_cli(capsys, *argv, "--style", "fancy")
    expected = (
        "train: argument --style: invalid choice: 'fancy' (choose from 'chat', 'plain') "
        "(see 'lorakit train --help')"
    )
    _one_error_line(code, out, err, expected)
    config = tmp_path / "run.yaml"
    config.write_text("style: fancy\n")
    code, out, err = run_cli(capsys, *argv, "--config", config)
    _one_error_line(
        code, out, err, f"config file {config}: style: 'fancy' is not one of chat, plain"
    )
    assert not (tmp_path / "o").exists()


# 5. a library warning during training: one lorakit line, the flag's spelling


def _show_as_python_does(message, category, filename, lineno, file=None, line=None):
    """Python's default ``showwarning`` (pytest records warnings instead): the text of
    ``warnings.formatwarning`` on stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_lora_bias_warning_is_one_line(tmp_path, capsys, monkeypatch, model_dir, jsonl):
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")  # Python's: once per call site
        monkeypatch.setattr(warnings, "showwarning", _show_as_python_does)
        code = train_cli(
            model_dir,
            jsonl,
            tmp_path / "o",
            *TINY[:4],
            "--lora-bias",
            "--target-modules",
            "lm_head",
        )
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if "bias" in line]
    assert lines == [
        "lorakit: warning: --lora-bias, but the base layer of target module(s) ['lm_head'] has "
        "no bias: the adapter trains and runs, but it cannot be merged into those layers (merge "
        "/ merge_and_unload will refuse). Target layers with a bias, or leave out --lora-bias "
        "to be able to merge."
    ], err
    assert "Warning:" not in err and ".py:" not in err


# 6. serve --adapters: a file, or one adapter's own directory


@pytest.fixture
def no_server(monkeypatch):
    """``uvicorn.run`` and the start-up freeze replaced: a command that would serve returns."""
    import uvicorn

    from lorakit.commands import serve

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "_freeze_start_up_objects", lambda: None)


def test_serve_refuses_a_file_and_an_adapter_directory(
    tmp_path, capsys, no_server, model_dir, adapter
):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ("serve", "--model", model_dir, "--port", "0", "--adapters")
    wanted = "the directory holding the adapters, one subdirectory each"
    _one_error_line(*run_cli(capsys, *argv, afile), f"--adapters {afile} is a file; give {wanted}")
    _one_error_line(*run_cli(capsys, *argv, "  "), f"--adapters is empty; give {wanted}")
    code, out, err = run_cli(capsys, *argv, adapter)
    _one_error_line(
        code,
        out,
        err,
        f"--adapters {adapter} is an adapter directory (it holds adapter_config.json); "
        f"--adapters takes {wanted} (named by it): give {adapter.resolve().parent} to serve it "
        "as 'adapter', or a directory you copy or link it into",
    )


# 7. Ctrl-C during a checkpoint save or prune: no temporary directory left behind


def _step(root: Path, step: int) -> Path:
    directory = checkpoint_dirs.step_directory(root, step)
    directory.mkdir(parents=True)
    (directory / checkpoint_dirs.STATE_FILE).write_text(json.dumps({"step": step}))
    (directory / "trainable.safetensors").write_bytes(b"x" * 100)
    return directory


def _save(output: Path, step: int) -> Path:
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), lambda s: 1.0
    )
    return checkpoint.save_checkpoint(output, step, None, None, scheduler, {}, keep=2, state=1)


def test_interrupted_save_removes_its_own_temporary_only(tmp_path, monkeypatch):
    root = checkpoint_dirs.checkpoint_root(tmp_path)
    _step(root, 1)
    other = root / f".tmp-step-00000009-{os.getppid()}"  # a live process's save under way
    other.mkdir()

    def half_written(directory, *args):
        (directory / "adapter").mkdir()
        (directory / "trainable.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_files", half_written)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == [other.name, "step-00000001"]


def test_interrupted_prune_deletes_the_whole_pruned_checkpoint(tmp_path, monkeypatch):
    root = checkpoint_dirs.checkpoint_root(tmp_path)
    for step in (1, 2, 3):
        _step(root, step)
    real_rmtree, interrupted = shutil.rmtree, []

    def interrupted_rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-pruned-") and Path(path).exists() and not interrupted:
            interrupted.append(path)
            (Path(path) / checkpoint_dirs.STATE_FILE).unlink()  # half deleted, then Ctrl-C
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_dirs.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_dirs.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]


def test_interrupt_between_the_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Saving step 2 again (a resumed run): Ctrl-C right after the old step-2 is moved aside
    puts it back and removes the new one's temporary: step 2's old files, nothing else."""
    root = checkpoint_dirs.checkpoint_root(tmp_path)
    old = _step(root, 2)
    real_replace = os.replace

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        if Path(source) == old:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_dirs.os, "replace", replace_then_interrupt)
    monkeypatch.setattr(checkpoint, "_write_files", lambda directory, *args: None)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert (old / "trainable.safetensors").read_bytes() == b"x" * 100


# 8. a run that wrote no checkpoint: the refusal names --overwrite, not --resume


def test_refusal_of_a_run_without_checkpoint_names_the_way_that_works(
    tmp_path, capsys, model_dir, jsonl
):
    output = tmp_path / "o"
    output.mkdir()
    (output / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", output, *TINY]
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    first = err.strip().splitlines()[-1]
    assert code == 2 and "--resume" not in first.split("so --resume cannot continue it")[-1]
    assert first == (
        f"lorakit: error: output directory {output} holds a previous training run "
        "(metrics.jsonl) that wrote no checkpoint, so --resume cannot continue it (checkpoints "
        "are written with --checkpoint-every N): start it over with --overwrite "
        "(TrainingConfig(overwrite=True); deletes that run's files), or choose another output "
        "directory"
    )
    code, _, err = run_cli(capsys, *argv, "--no-progress", "--overwrite")  # the way named works
    assert code == 0, err
    # with a checkpoint, --resume is the first way out, as before
    _step(checkpoint_dirs.checkpoint_root(output), 1)
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 2 and "; continue it with --resume (resume=True)" in err
