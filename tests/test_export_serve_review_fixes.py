"""Fixes from the export and serving reviews: ``lorakit export`` naming a SOURCE that is no
adapter (missing, named adapters, no config) instead of advising to leave --model out; an
adapter with nothing left after --drop-unsupported saying what was dropped; ``lorakit serve``
naming its own options for a too-small --adapter-memory and refusing a non-size before the model
loads; the bank's budget excluding DoRA gain tables; a float64 bank keeping each scaling (and
DoRA gain) in float64, as ``load_adapter`` does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser, main
from lorakit.errors import UserError
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from tests import tiny_models

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _saved_adapter(directory, seed: int = 3, dtype=torch.float32, **config):
    model = lorakit.inject(tiny_models.llama(dtype=dtype), lorakit.LoraConfig(**config))
    tiny_models.randomize_adapters(model, seed=seed, std=0.3)
    save_adapter(model, directory)
    return directory


def _export(capsys, source, *options) -> tuple[int, str]:
    code = main(["export", str(source), "--format", "gguf", *map(str, options)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ----------------------------------------------------------------- 1. export SOURCE


def test_export_with_model_and_a_missing_source_says_the_adapter_is_missing(tmp_path, capsys):
    output = tmp_path / "out.gguf"
    for option in (["--model", tmp_path / "base"], ["--drop-unsupported"]):
        code, text = _export(capsys, tmp_path / "nope", "--output", output, *option)
        assert code == 2
        assert f"adapter directory {tmp_path / 'nope'} does not exist" in text
        assert "leave --model out" not in text and "goes with an adapter" not in text
    assert not output.exists()


def test_export_of_named_adapters_names_them_with_or_without_model(tmp_path, capsys):
    source = tmp_path / "saved"
    _saved_adapter(source / "other", r=4, lora_alpha=8, target_modules=["q_proj"])
    output = tmp_path / "out.gguf"
    for option in ([], ["--model", tmp_path / "base"], ["--drop-unsupported"]):
        code, text = _export(capsys, source, "--output", output, *option)
        assert code == 2
        assert f"adapters in subdirectories ({source / 'other'}" in text
        assert "config.json;" not in text and "leave --model out" not in text
    assert not output.exists()


def test_export_with_model_of_a_folder_without_config_names_adapter_config(tmp_path, capsys):
    adapter = _saved_adapter(tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    source = tmp_path / "noconf"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    code, text = _export(capsys, source, "--model", tmp_path, "--output", tmp_path / "o.gguf")
    assert code == 2
    assert f"no adapter_config.json in {source}" in text and "leave --model out" not in text


def test_export_of_a_model_with_model_still_says_to_leave_model_out(model_dir, tmp_path, capsys):
    code, text = _export(capsys, model_dir, "--model", model_dir, "--output", tmp_path / "o.gguf")
    assert code == 2 and "leave --model out" in text


# ----------------------------------------------------------------- 2. nothing left to export


def test_drop_unsupported_that_drops_every_pair_lists_them_and_says_merge(tmp_path):
    from lorakit.export.gguf_adapter import export_adapter

    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    adapter = lorakit.inject(
        copy.deepcopy(tied), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
    )
    tiny_models.randomize_adapters(adapter, std=0.2)
    save_adapter(adapter, tmp_path / "head")
    output = tmp_path / "head.gguf"
    with pytest.raises(UserError) as refused:
        export_adapter(tmp_path / "head", tied, output, drop_unsupported=True)
    message = str(refused.value)
    assert "lm_head (LoRA): lm_head is tied to the token embedding" in message
    assert "Nothing llama.cpp can apply remains" in message
    assert "lorakit export MODEL --adapter DIR" in message
    assert "--drop-unsupported" not in message  # it would not help
    assert not output.exists()


# ----------------------------------------------------------------- 3. serve options


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", "--model", "m", "--adapters", "a", *argv])


def test_a_non_size_adapter_memory_is_refused_by_check_numbers():
    from lorakit.commands._serve_options import check_numbers

    for text in ("abc", "0"):
        with pytest.raises(UserError, match="--adapter-memory"):
            check_numbers(_serve_args("--adapter-memory", text))
    check_numbers(_serve_args("--adapter-memory", "64KiB"))  # a size: accepted


def test_a_too_small_adapter_memory_names_the_cli_options(model_dir, tmp_path):
    from lorakit.commands.serve import build

    _saved_adapter(tmp_path / "adapters" / "one", r=4, lora_alpha=8, target_modules=["q_proj"])
    argv = ["--adapters", str(tmp_path / "adapters"), "--adapter-memory", "1KB"]
    args = build_parser().parse_args(["serve", "--model", str(model_dir), *argv])
    with pytest.raises(UserError) as refused:
        build(args)
    message = str(refused.value)
    assert "--adapter-memory 1KB (1000 bytes) holds no adapter of rank 4" in message
    assert "--max-rank" in message and "memory_budget" not in message


def test_pool_sizes_error_carries_the_sizes():
    from lorakit.serve.pool_sizes import BudgetTooSmall, pool_sizes

    with pytest.raises(BudgetTooSmall) as refused:
        pool_sizes(
            {"q": 100},
            max_rank=8,
            per_adapter=2,
            slot_overhead=10,
            capacity=None,
            memory_budget=150,
        )
    assert (refused.value.memory_budget, refused.value.max_rank) == (150, 8)
    assert refused.value.adapter_bytes == 2 * 100 + 10
    assert isinstance(refused.value, ValueError)


# ----------------------------------------------------------------- 4 and 5. the bank


@pytest.fixture(scope="module")
def float64_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters64")
    specs = {
        "rs": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, use_rslora=True),
        "plain": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True),
    }
    for seed, (name, config) in enumerate(specs.items()):
        _saved_adapter(root / name, seed=10 + seed, dtype=torch.float64, **config)
    return root, list(specs)


def _reference_logits(root, name, ids):
    model = tiny_models.llama(dtype=torch.float64)
    lorakit.load_adapter(model, root / name)
    with torch.no_grad():
        return model(ids).logits[0]


def test_a_float64_bank_matches_load_adapter_in_a_mixed_batch(float64_adapters):
    from lorakit.io.read import read_adapter

    root, names = float64_adapters
    served = tiny_models.llama(dtype=torch.float64)
    prepare_for_serving(served, ALL_LINEAR)
    bank = AdapterBank(served, max_rank=8, capacity=4)
    assert bank.dtype == torch.float64
    for name in names:
        read = read_adapter(root / name)
        bank.load(name, read.config, read.tensors)
    ids = tiny_models.input_ids(batch=1, length=10)
    slots = torch.tensor([[bank.slot_of(name)] * ids.shape[1] for name in names])
    with routed(bank, slots), torch.no_grad():
        logits = served(ids.expand(len(names), -1)).logits
    for row, name in enumerate(names):
        expected = _reference_logits(root, name, ids)
        assert (logits[row] - expected).abs().max().item() < 1e-12, name


def test_the_budget_holds_pools_and_scalings_and_gains_come_on_top(float64_adapters):
    from lorakit.io.read import read_adapter

    root, _ = float64_adapters
    served = tiny_models.llama(dtype=torch.float64)
    prepare_for_serving(served, ALL_LINEAR)
    probe = AdapterBank(served, max_rank=8, capacity=1)
    assert probe.slot_overhead == 8 * len(ALL_LINEAR) * 2  # a float64 scaling per layer
    budget = 6 * (probe.page_bytes + probe.slot_overhead)
    bank = AdapterBank(served, max_rank=8, memory_budget=budget)
    pools = bank.memory_bytes()
    assert pools <= budget
    read = read_adapter(root / "dora")
    bank.load("dora", read.config, read.tensors)
    stacks = bank._stacks.values()
    gains = sum(s.dora_gain.nbytes for s in stacks if s.dora_gain is not None)
    assert gains > 0 and bank.memory_bytes() == pools + gains
    assert "outside the budget" in " ".join(AdapterBank.__doc__.split())


def test_a_train_output_directory_given_as_the_adapter_points_to_its_adapter(
    tmp_path, capsys, model_dir
):
    run = tmp_path / "run"
    _saved_adapter(run / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    (run / "metrics.jsonl").write_text("{}\n")
    code, text = _export(capsys, run, "--output", tmp_path / "o.gguf")
    assert code == 2
    assert f"({run / 'adapter'};" in text and "give one of those directories" in text
    code = main(["generate", "good film", "--model", str(model_dir), "--adapter", str(run)])
    assert code == 2 and f"({run / 'adapter'};" in capsys.readouterr().err


def test_a_builtin_name_that_is_also_a_local_directory_says_which_is_meant(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _saved_adapter(tmp_path / "smollm2-135m-instruct" / "run1", r=2, target_modules=["q_proj"])
    code, text = _export(capsys, "smollm2-135m-instruct", "--model", "x", "--output", "o.gguf")
    assert code == 2 and "leave --model out" in text
    assert "give ./smollm2-135m-instruct/<adapter directory>" in text
