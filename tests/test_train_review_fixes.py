"""Training fixes of a review: --resume without a checkpoint, on another base, with the targets
in another order, of a finished run, from ``--config train_settings.json``; the adapter name
checked up front; ``examples_seen``; weight decay as transformers.Trainer; CUDA RNG states."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.train import BatchOrder, TrainingConfig, pad_collate, train
from lorakit.train import rng as rng_module
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.optim import build_optimizer
from lorakit.train.resume import check_resumable
from tests import tiny_models
from tests.cli_runs import train_cli
from tests.train_job import make_data

TARGETS = ["q_proj", "v_proj"]


def _model(targets=TARGETS, base_seed: int = 0, **lora) -> torch.nn.Module:
    """The tiny Llama of ``base_seed`` with a LoRA adapter on ``targets`` (A drawn from seed 11)."""
    model = tiny_models.llama(seed=base_seed)
    torch.manual_seed(11)
    return lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora)
    )


def _config(output: Path, **overrides) -> TrainingConfig:
    settings = dict(output_dir=str(output), max_steps=4, batch_size=4, progress=False, plot=False)
    return TrainingConfig(**{**settings, **overrides})


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").open()]


def _interrupted(output: Path, model=None, **overrides) -> None:
    """A 4-step run with checkpoints at steps 2 and 4, the last one removed: killed after 2."""
    config = _config(output, checkpoint_every=2, **overrides)
    train(model if model is not None else _model(), make_data(16), pad_collate(0), config)
    shutil.rmtree(output / "checkpoints" / "step-00000004")


# ---------------------------------------------------------------- --resume without a checkpoint
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_where_there_is_no_run_is_refused_saying_to_start_one(tmp_path, state):
    output = tmp_path / "run"
    if state == "empty":
        output.mkdir()
    with pytest.raises(UserError) as error:
        train(_model(), make_data(16), pad_collate(0), _config(output), resume=True)
    message = str(error.value)
    where = "it does not exist" if state == "missing" else "it holds no training run"
    assert message == (
        f"--resume (resume=True): no checkpoint to resume in {output} ({where}). Start a new "
        "run: the same command without --resume"
    )
    assert output.exists() == (state == "empty") and not list(tmp_path.glob("run/*"))


def test_cli_resume_of_a_run_without_checkpoints_is_refused_before_loading(
    tmp_path, capsys, model_dir, jsonl
):
    """The reviewer's case: a finished run without checkpoints, then --resume with another lr,
    retrained over the adapter and left train_settings.json describing the old run."""
    output = tmp_path / "o"
    settings = ["--steps", "3", "--batch-size", "4", "--r", "4"]
    assert train_cli(model_dir, jsonl, output, *settings, "--lr", "1e-2") == 0
    before = {p.name: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train_cli(model_dir, jsonl, output, *settings, "--lr", "0.5", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no checkpoint to resume in {output}" in err
    assert "--overwrite" in err and "training on" not in err  # refused before the model loads
    assert {p.name: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- the base model
def test_resume_on_other_base_weights_is_refused_before_anything_loads(tmp_path):
    _interrupted(tmp_path)
    other = _model(base_seed=1)
    before = _trainable(other)
    with pytest.raises(BaseModelMismatchError) as error:
        train(
            other, make_data(16), pad_collate(0), _config(tmp_path, checkpoint_every=2), resume=True
        )
    message = str(error.value)
    adapter = tmp_path / "checkpoints" / "step-00000002" / "adapter"
    assert f"adapter {adapter} was trained on different base weights" in message
    assert "--model and --quantization" in message and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in _trainable(other).items())
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4]  # untouched


def test_a_checkpoint_without_a_fingerprint_still_resumes(tmp_path):
    """A checkpoint whose adapter file carries no base fingerprint is not checked: it resumes to
    the uninterrupted run's adapter."""
    straight = _model()
    train(straight, make_data(16), pad_collate(0), _config(tmp_path / "straight"))
    _interrupted(tmp_path / "run")
    weights = tmp_path / "run" / "checkpoints" / "step-00000002" / "adapter"
    weights = weights / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt"})
    resumed = _model()
    config = _config(tmp_path / "run", checkpoint_every=2)
    train(resumed, make_data(16), pad_collate(0), config, resume=True)
    for name, tensor in _trainable(straight).items():
        assert torch.equal(_trainable(resumed)[name], tensor), name


# ---------------------------------------------------------------- target order, finished runs
def test_resume_accepts_the_same_target_modules_in_another_order(tmp_path):
    straight = _model()
    train(straight, make_data(16), pad_collate(0), _config(tmp_path / "straight"))
    _interrupted(tmp_path / "run")
    resumed = _model(targets=["v_proj", "q_proj"])
    config = _config(tmp_path / "run", checkpoint_every=2)
    assert train(resumed, make_data(16), pad_collate(0), config, resume=True).resumed_from == 2
    for name, tensor in _trainable(straight).items():
        assert torch.equal(_trainable(resumed)[name], tensor), name


def test_the_resume_check_compares_module_lists_as_sets_and_token_ids_in_order(tmp_path):
    config = _config(tmp_path)

    def check(saved: dict, now: dict) -> None:
        check_resumable(tmp_path, {"step": 2, "lora_config": saved}, {}, config, now)

    check({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["v_proj", "q_proj"]})
    check({"modules_to_save": ["lm_head", "norm"]}, {"modules_to_save": ["norm", "lm_head"]})
    with pytest.raises(UserError, match=r"--target-modules \['q_proj'\] \(the checkpoint's: \["):
        check({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj"]})
    with pytest.raises(UserError, match="--trainable-token-indices"):  # row order of the delta
        check({"trainable_token_indices": [5, 7]}, {"trainable_token_indices": [7, 5]})


def test_resuming_a_finished_run_adds_no_second_final_evaluation(tmp_path):
    data, held = make_data(16), make_data(4, seed=6)
    config = _config(tmp_path, checkpoint_every=4, eval_every=3)
    first = train(_model(), data, pad_collate(0), config, eval_data=held)
    records = _records(tmp_path)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 4]
    again = train(_model(), data, pad_collate(0), config, eval_data=held, resume=True)
    assert _records(tmp_path) == records
    assert again.resumed_from == 4 and again.eval_metrics == first.eval_metrics != {}


# ---------------------------------------------------------------- checks up front
def test_an_adapter_name_the_model_lacks_is_refused_before_training(tmp_path):
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="sst")
    with pytest.raises(UserError) as error:
        train(model, make_data(16), pad_collate(0), _config(tmp_path, max_steps=20))
    assert not (tmp_path / "metrics.jsonl").exists()  # not one step trained
    named = "no adapter named 'default' (TrainingConfig.adapter_name; its adapters: 'sst')"
    assert named in str(error.value)
    config = _config(tmp_path, max_steps=1, adapter_name="sst")
    assert train(model, make_data(16), pad_collate(0), config).steps == 1


def test_eval_every_without_evaluation_data_is_refused(tmp_path, capsys, model_dir, jsonl):
    with pytest.raises(UserError, match=r"eval_every=2 \(--eval-every\) evaluates on eval_data"):
        train(_model(), make_data(16), pad_collate(0), _config(tmp_path, eval_every=2))
    assert train_cli(model_dir, jsonl, tmp_path / "o", "--eval-every", "2") == 2
    err = capsys.readouterr().err
    assert "--eval-every 2 evaluates on --eval-data, which is not given" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- --config train_settings.json
def test_config_train_settings_resume_continues_a_run_started_with_overwrite(
    tmp_path, capsys, model_dir, jsonl
):
    output = tmp_path / "o"
    settings = ["--steps", "4", "--batch-size", "4", "--r", "4", "--checkpoint-every", "2"]
    assert train_cli(model_dir, jsonl, output, *settings) == 0
    assert train_cli(model_dir, jsonl, output, *settings, "--overwrite") == 0
    record = output / "train_settings.json"
    recorded = json.loads(record.read_text())
    assert "overwrite" not in recorded and "resume" not in recorded and recorded["steps"] == 4
    shutil.rmtree(output / "checkpoints" / "step-00000004")  # killed after step 2's checkpoint
    capsys.readouterr()
    assert cli_main("train", "--config", record, "--resume", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "4 optimizer steps of 4 examples (resuming after step 2: 2 remain)" in err
    # a record of an older lorakit says "overwrite": true: --resume sets it aside
    record.write_text(json.dumps({**recorded, "overwrite": True, "resume": False}))
    shutil.rmtree(output / "checkpoints" / "step-00000004")
    assert cli_main("train", "--config", record, "--resume", "--no-progress") == 0
    assert json.loads(record.read_text())["overwrite"] is True  # the run's record, kept


def cli_main(*argv) -> int:
    from lorakit import cli

    return cli.main([str(a) for a in argv])


# ---------------------------------------------------------------- examples_seen
def test_examples_seen_counts_the_short_batch_as_it_is(tmp_path):
    """10 examples in batches of 4: each epoch is 4 + 4 + 2 examples."""
    config = _config(tmp_path, max_steps=6, checkpoint_every=1, keep_checkpoints=6)
    train(_model(), make_data(10), pad_collate(0), config)
    seen = [
        json.loads((path / "trainer_state.json").read_text())["examples_seen"]
        for path in sorted((tmp_path / "checkpoints").iterdir())
    ]
    assert seen == [4, 8, 10, 14, 18, 20]
    dropped = BatchOrder(10, 2, world_size=2, drop_last=True)  # torchrun drops the short one
    assert [dropped.examples_before(step) for step in range(5)] == [0, 4, 8, 12, 16]


# ---------------------------------------------------------------- weight decay
def _decayed_names(model, optimizer) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}


@pytest.mark.parametrize(
    ("base", "lora"),
    [
        (tiny_models.llama, {"lora_bias": True, "modules_to_save": ["norm"]}),  # RMSNorm names
        (tiny_models.llama, {"use_dora": True, "modules_to_save": ["norm"]}),
        (tiny_models.gpt2, {"bias": "all", "modules_to_save": ["ln_f"]}),  # nn.LayerNorm: ln_f
    ],
)
def test_weight_decay_spares_biases_and_norm_weights_as_transformers_trainer(base, lora):
    from transformers import Trainer

    targets = ["c_attn"] if base is tiny_models.gpt2 else TARGETS
    model = lorakit.inject(base(), lorakit.LoraConfig(r=4, target_modules=targets, **lora))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set(Trainer.get_decay_parameter_names(None, model)) & trainable
    assert _decayed_names(model, optimizer) == expected
    assert expected != trainable and any("lora_A" in n for n in expected)
    if lora.get("use_dora"):  # DoRA magnitudes decay, as under peft + Trainer
        assert any("lora_magnitude_vector" in n for n in expected)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    # values: zero gradients for 10 steps: decayed tensors shrink by (1 - lr * wd)^10, others stay
    before = _trainable(model)
    for _ in range(10):
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    for name, tensor in _trainable(model).items():
        factor = (1 - 1e-2 * 0.1) ** 10 if name in expected else 1.0
        torch.testing.assert_close(tensor, before[name] * factor, rtol=1e-6, atol=0)


def test_loraplus_keeps_its_rates_and_spares_biases_from_decay():
    model = _model(lora_bias=True)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, loraplus_ratio=4.0)
    names = {id(p): n.split("self_attn.")[-1] for n, p in model.named_parameters()}
    groups = [
        (g["lr"], g["weight_decay"], sorted({names[id(p)] for p in g["params"]}))
        for g in optimizer.param_groups
    ]
    assert groups == [
        (1e-3, 0.1, ["q_proj.lora_A.default.weight", "v_proj.lora_A.default.weight"]),
        (1e-3, 0.0, ["q_proj.lora_B.default.bias", "v_proj.lora_B.default.bias"]),
        (4e-3, 0.1, ["q_proj.lora_B.default.weight", "v_proj.lora_B.default.weight"]),
    ]
    plain = build_optimizer(model, lr=1e-3, loraplus_ratio=4.0)  # no decay: LoRA+'s two groups
    assert len(plain.param_groups) == 2


def test_a_checkpoint_of_the_decay_everything_optimizer_resumes_exactly(tmp_path, monkeypatch):
    """A checkpoint written when biases were decayed too (one optimizer group) continues under
    that rule, with a warning, to the adapter its uninterrupted run would have given."""
    from lorakit.train import loop
    from lorakit.train import optim as optim_module

    def old_rule(*args, **kwargs):
        return optim_module.build_optimizer(*args, **{**kwargs, "decay_all": True})

    with monkeypatch.context() as patch:  # the older lorakit: one group, no rule in the state
        patch.setattr(loop, "build_optimizer", old_rule)
        old_straight = _model(lora_bias=True)
        config = _config(tmp_path / "straight", weight_decay=0.1)
        train(old_straight, make_data(16), pad_collate(0), config)
        _interrupted(tmp_path / "run", _model(lora_bias=True), weight_decay=0.1)
    state_file = latest_checkpoint(tmp_path / "run") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert len(state.pop(optim_module.DECAY_RULE_KEY)) and len(state["optimizer_param_groups"]) == 1
    state_file.write_text(json.dumps(state))
    resumed = _model(lora_bias=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = _config(tmp_path / "run", checkpoint_every=2, weight_decay=0.1)
        train(resumed, make_data(16), pad_collate(0), config, resume=True)
    assert any(
        "applied weight decay to biases and norm weights too" in str(w.message) for w in caught
    )
    for name, tensor in _trainable(old_straight).items():
        assert torch.equal(_trainable(resumed)[name], tensor), name
    written = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert optim_module.DECAY_RULE_KEY not in written  # its checkpoints keep saying the older rule


# ---------------------------------------------------------------- RNG states
def test_rng_states_round_trip_on_the_cpu_without_cuda_entries(tmp_path):
    tensors, fields = rng_module.capture_rng_state()
    assert set(tensors) == {"torch_cpu", "numpy_keys"}  # a CPU run stores what it did
    expected = torch.rand(5)
    torch.rand(3)
    rng_module.restore_rng_state(tensors, fields)  # an older checkpoint: no CUDA entries either
    assert torch.equal(torch.rand(5), expected)


def test_cuda_rng_states_are_saved_and_restored_when_cuda_is_in_use(monkeypatch):
    """(No GPU here: torch.cuda stands in.) Every device's state is saved; a device this machine
    lacks is not restored."""
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        cuda, "set_rng_state", lambda state, device: restored.append((state, device))
    )
    tensors, fields = rng_module.capture_rng_state()
    assert torch.equal(tensors["torch_cuda_0"], states[0])
    assert torch.equal(tensors["torch_cuda_1"], states[1])
    rng_module.restore_rng_state(tensors, fields)
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], states[0])
