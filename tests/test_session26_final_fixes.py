"""Fixes from the last review of this round's changes.

- A run resumed from an older checkpoint (fractional ``--epochs`` rounded half to even) can be
  resumed again from its own checkpoints.
- BitNet's float modules (norms, blocks) are not taken for quantized layers; its
  ``AutoBitLinear`` still is.
- A DoRA layer runs on the meta device (shapes only) more than once.
- ``--output`` is refused only for the files a save writes; other files are kept.
- Ray Serve's bank-size error gives no impossible advice.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from transformers import BitNetConfig, BitNetForCausalLM

import lorakit
from lorakit import quantized
from lorakit.cli import main
from lorakit.train import TrainingConfig, pad_collate, train
from tests import tiny_models
from tests.train_job import make_data, q_proj_model


def test_a_run_resumed_from_an_older_checkpoint_resumes_again(tmp_path):
    data = make_data(40)  # 10 steps an epoch of 4
    config = TrainingConfig(
        output_dir=str(tmp_path),
        epochs=0.42,  # 4.2 steps: 4 before (round), 5 now (ceil)
        batch_size=4,
        checkpoint_every=1,
        keep_checkpoints=10,
        progress=False,
    )

    def keep_only(step: int) -> None:
        for directory in sorted((tmp_path / "checkpoints").iterdir()):
            if int(directory.name.removeprefix("step-")) > step:
                shutil.rmtree(directory)

    assert train(q_proj_model(), data, pad_collate(0), config).steps == 5
    keep_only(1)
    state_path = tmp_path / "checkpoints" / "step-00000001" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["data_plan"]["examples_sha256"]  # as an older lorakit wrote it,
    state["data_plan"]["total_steps"] = 4  # with round(0.42 * 10) = 4 steps
    state_path.write_text(json.dumps(state))
    assert train(q_proj_model(), data, pad_collate(0), config, resume=True).steps == 4
    keep_only(2)  # killed again after step 2: its checkpoint is of this lorakit, counted "round"
    plan = json.loads(
        (tmp_path / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    )["data_plan"]
    assert plan["steps_rule"] == "round" and plan["examples_sha256"] is not None
    assert train(q_proj_model(), data, pad_collate(0), config, resume=True).steps == 4


def tiny_bitnet():
    config = BitNetConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return BitNetForCausalLM(config)


def test_bitnets_float_modules_are_not_quantized_layers():
    model = tiny_bitnet()
    flagged = {
        type(module).__name__
        for _, module in model.named_modules()
        if quantized.looks_quantized(module) is not None
    }
    assert flagged <= {"AutoBitLinear", "BitLinear"}
    config = lorakit.LoraConfig(r=4, target_modules=["lm_head"], modules_to_save=["model.norm"])
    lorakit.inject(model, config)  # the RMSNorm is copied in full, as PEFT does
    assert any("model.norm" in name and p.requires_grad for name, p in model.named_parameters())


def test_a_dora_layer_runs_twice_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=2, use_dora=True, target_modules=["0"]))
    x = torch.empty(3, 16, device="meta")
    for _ in range(2):
        with torch.no_grad():
            out = model(x)
        assert out.is_meta and out.shape == (3, 8)


def test_combine_keeps_other_files_and_refuses_only_an_adapter(tmp_path, capsys):
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model, std=0.1)
    lorakit.save_adapter(model, tmp_path / "a")
    output = tmp_path / "out"
    output.mkdir()
    (output / "embeddings.safetensors").write_bytes(b"not an adapter")
    arguments = ["combine", str(tmp_path / "a"), str(tmp_path / "a"), "--output", str(output)]
    assert main(arguments) == 0
    assert (output / "embeddings.safetensors").read_bytes() == b"not an adapter"
    capsys.readouterr()
    assert main(arguments) == 2  # now it holds an adapter
    assert "holds an adapter (adapter_config.json, adapter_model.safetensors)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("max_adapters", [0, 1])
def test_ray_bank_size_errors_give_possible_advice(max_adapters):
    from lorakit.serve.ray_deployment import BankTooSmallError, build_app

    arguments = ["--model", "m", "--adapters", "a", "--max-adapters", str(max_adapters)]
    with pytest.raises(BankTooSmallError) as raised:
        build_app(arguments, adapters_per_replica=4)
    message = str(raised.value)
    assert "adapters_per_replica to 0" not in message and "to -1" not in message
    if max_adapters == 0:
        assert "--max-adapters must be >= 1, got 0" in message
    else:
        assert "set --max-adapters to at least 5" in message


# ----------------------------------------------------------------- the review of the fixes above
def test_carried_copies_in_three_dtypes_give_the_same_result_in_every_order():
    from itertools import permutations

    from lorakit.combining.compatible import carried_base_weights
    from lorakit.combining.sources import AdapterUpdates
    from lorakit.errors import BaseModelMismatchError

    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])

    def source(label: str, tensor: torch.Tensor) -> AdapterUpdates:
        return AdapterUpdates(label, config, {}, None, {"model.embed_tokens": tensor})

    copies = [source(str(d), weight.to(d)) for d in (torch.float32, torch.bfloat16, torch.float16)]
    for order in permutations(copies):
        carried = carried_base_weights(order)["model.embed_tokens"]
        assert carried.dtype == torch.float32 and torch.equal(carried, weight)
    other = weight.clone()
    other[0, 0] += 1.0
    with pytest.raises(BaseModelMismatchError, match="with other values"):
        carried_base_weights([copies[1], source("other", other)])


def test_a_resumed_older_run_is_announced_with_its_own_count(model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"question {i} is", "completion": f" answer {i % 3}"} for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    options = {
        "--model": model_dir,
        "--data": data,
        "--epochs": 0.42,
        "--batch-size": 4,
        "--checkpoint-every": 1,
        "--keep-checkpoints": 10,
        "--output": output,
        "--target-modules": "q_proj",
    }
    arguments = ["train", *(str(x) for pair in options.items() for x in pair), "--no-progress"]
    assert main(arguments) == 0  # 10 steps an epoch: 5 steps (ceil of 4.2)
    for directory in sorted((output / "checkpoints").iterdir())[1:]:
        shutil.rmtree(directory)
    state_path = output / "checkpoints" / "step-00000001" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["data_plan"]["examples_sha256"]  # an older lorakit's checkpoint: round(4.2) = 4
    state["data_plan"]["total_steps"] = 4
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*arguments, "--resume"]) == 0
    assert "4 optimizer steps of 4 examples (resuming after step 1: 3 remain)" in (
        capsys.readouterr().err
    )
    # a checkpoint of that resumed run, resumed with --steps of the same length: accepted
    for directory in sorted((output / "checkpoints").iterdir())[2:]:
        shutil.rmtree(directory)
    steps = [a for a in arguments if a not in ("--epochs", "0.42")] + ["--steps", "4"]
    assert main([*steps, "--resume"]) == 0
    assert "steps rule" not in capsys.readouterr().err


@pytest.mark.parametrize("per_replica", [-1, 0])
def test_ray_adapters_per_replica_must_be_positive(per_replica):
    from lorakit.serve.ray_deployment import BankTooSmallError, build_app

    with pytest.raises(
        BankTooSmallError, match=f"adapters_per_replica must be >= 1, got {per_replica}"
    ):
        build_app(["--model", "m", "--adapters", "a"], adapters_per_replica=per_replica)


def test_vector_quantizers_are_float_modules_not_quantized_layers():
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_codevectors_per_group=8,
        codevector_dim=16,
        proj_codevector_dim=16,
    )
    model = Wav2Vec2ForPreTraining(config)
    assert all(quantized.looks_quantized(m) is None for _, m in model.named_modules())
    inject_config = lorakit.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["quantizer"]
    )
    lorakit.inject(model, inject_config)
    assert any("quantizer" in n and p.requires_grad for n, p in model.named_parameters())
    quanto_like = type("QLinear", (nn.Linear,), {"__module__": "optimum.quanto.nn.qlinear"})
    assert quantized.looks_quantized(quanto_like(4, 4)) is not None


def test_float16_and_bfloat16_copies_of_one_weight_combine_in_either_order():
    from lorakit.combining.compatible import carried_base_weights
    from lorakit.combining.sources import AdapterUpdates
    from lorakit.errors import BaseModelMismatchError

    weight = 0.02 * torch.randn(1000, 64, generator=torch.Generator().manual_seed(1))
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])

    def source(label: str, tensor: torch.Tensor) -> AdapterUpdates:
        return AdapterUpdates(label, config, {}, None, {"model.embed_tokens": tensor})

    half, brain = source("f16", weight.half()), source("bf16", weight.bfloat16())
    assert (weight.half().bfloat16() != weight.bfloat16()).any()  # rounded twice: they differ
    for order in ([half, brain], [brain, half]):
        assert carried_base_weights(order)["model.embed_tokens"].dtype == torch.float16
    with pytest.raises(BaseModelMismatchError):
        carried_base_weights([half, source("other", (weight + 0.01).bfloat16())])


@pytest.mark.parametrize(
    ("world", "short_batch", "batch_size", "announced"),
    [
        (1, "dropped (2 of 10 examples)", 4, "6 optimizer steps"),  # a torchrun checkpoint
        (2, "kept (2 of 10 examples)", 2, "9 optimizer steps"),  # a one-process checkpoint
    ],
)
def test_a_resume_across_process_counts_announces_the_loops_count(
    monkeypatch, capsys, tmp_path, world, short_batch, batch_size, announced
):
    from lorakit.train.run import _announce

    class Examples(list):
        num_truncated = 0

    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = TrainingConfig(output_dir=str(tmp_path), batch_size=batch_size, epochs=3)
    plan = {"num_examples": 10, "global_batch": 4, "short_batch": short_batch}
    state = {"step": 2, "data_plan": {**plan, "examples_sha256": "x"}}
    _announce(nn.Linear(4, 4), {"train": Examples(range(10))}, config, 64, state)
    assert announced in capsys.readouterr().err


def test_float16_and_bfloat16_copies_agree_only_within_their_rounding():
    from lorakit.combining.compatible import same_up_to_rounding

    one = torch.tensor([1.0])
    neighbour = torch.nextafter(one.bfloat16(), torch.tensor([2.0]).bfloat16())  # 1 + 2^-7
    assert not same_up_to_rounding(one.half(), neighbour)  # one bfloat16 step apart
    assert not same_up_to_rounding(torch.tensor([torch.inf]).half(), one.bfloat16())
    assert not same_up_to_rounding(
        torch.tensor([torch.inf]).half(), torch.tensor([-torch.inf]).bfloat16()
    )
    weight = torch.randn(500, 64, generator=torch.Generator().manual_seed(2))
    assert same_up_to_rounding(weight.half(), weight.bfloat16())
