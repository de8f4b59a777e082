"""bitsandbytes' packed CPU kernel for 4-bit layers, on purpose and for inference only
(``lorakit.quantized.bnb_cpu_kernel``, ``--bnb-cpu-kernel``): the codes' unpacking against the
bytes as loaded, outputs against PEFT on bitsandbytes' defaults, and every refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import has_avx512bf16  # noqa: E402

import lorakit  # noqa: E402
from lorakit import cli  # noqa: E402
from lorakit.io import fingerprint, load_adapter, save_adapter  # noqa: E402
from lorakit.quantized import UnsupportedQuantizedLayerError  # noqa: E402
from lorakit.quantized.bnb_cpu_kernel import (  # noqa: E402
    is_packed,
    unpacked_codes,
    use_bnb_cpu_kernel,
)
from lorakit.state import lora_layers  # noqa: E402
from tests import tiny_models  # noqa: E402

pytestmark = pytest.mark.skipif(
    not has_avx512bf16(), reason="bitsandbytes' packed CPU kernel needs AVX512-BF16"
)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear4bit(out_features, in_features, *, nested, quant_type, storage=torch.uint8, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=True,
        compute_dtype=torch.float32,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features),
        requires_grad=False,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    return layer.to("cpu")


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_unpacked_codes_are_the_bytes_as_loaded(nested, quant_type, storage):
    layer = _linear4bit(64, 128, nested=nested, quant_type=quant_type, storage=storage)
    loaded, bias = layer.weight.data.clone(), layer.bias.data.clone()
    assert use_bnb_cpu_kernel(torch.nn.Sequential(layer)) == 1
    assert is_packed(layer) and not torch.equal(layer.weight.data.view(torch.uint8), loaded)
    unpacked = unpacked_codes(layer)
    assert unpacked.dtype == storage and unpacked.shape == loaded.shape
    assert torch.equal(unpacked.view(torch.uint8), loaded.view(torch.uint8))  # bit for bit
    assert torch.equal(layer.bias.data, bias) and layer.bias.dtype == torch.float32


def _nf4_llama(intermediate_size=128):
    """A tiny Llama with every projection an NF4 ``Linear4bit`` (double quantization), the
    stored bytes kept (``keep_4bit_storage``, as lorakit loads it)."""
    from lorakit.quantized.loading import keep_4bit_storage

    torch.manual_seed(0)
    config = tiny_models.llama_config(intermediate_size=intermediate_size)
    model = LlamaForCausalLM(config).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in SEVEN:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=False,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data.clone(), requires_grad=False, quant_type="nf4"
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    keep_4bit_storage(model)
    return model.requires_grad_(False)


def _with_adapter(model, library):
    """``model`` with an r=4 adapter on the seven projections, B non-zero (seeded)."""
    fields = dict(r=4, lora_alpha=8, target_modules=SEVEN)
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**fields))
    else:
        lorakit.inject(model, lorakit.LoraConfig(**fields))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_outputs_equal_peft_on_bitsandbytes_defaults_and_stay_near_the_exact_ones():
    """PEFT's LoRA on a 4-bit base with bitsandbytes' defaults runs that kernel (the repack at
    its first eval no-grad forward): lorakit with the kernel computes the same logits; both
    are bfloat16's rounding away from the exact (repack off) ones."""
    base = _nf4_llama()
    ours = _with_adapter(copy.deepcopy(base), "lorakit")
    default = copy.deepcopy(base)
    for module in default.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default
    theirs = _with_adapter(default, "peft")
    ids = tiny_models.input_ids()
    with torch.no_grad():
        exact = ours(ids).logits
        use_bnb_cpu_kernel(ours)
        fast, peft_logits = ours(ids).logits, theirs(ids).logits
    assert all(is_packed(m.base_layer) for _, m in lora_layers(ours))
    assert (fast - peft_logits).abs().max() <= 1e-5
    relative = (fast - exact).norm() / exact.norm()
    assert 0 < relative < 2e-2  # bfloat16 products and scales: not the exact path
    assert (exact - base(ids).logits).abs().max() > 1e-2  # the adapter moves the logits


def test_the_fingerprint_is_unchanged_so_saved_adapters_load_after_the_repack(tmp_path):
    model = _with_adapter(_nf4_llama(), "lorakit")
    before = {
        name: fingerprint.base_identity(layer)[0].clone() for name, layer in lora_layers(model)
    }
    save_adapter(model, tmp_path / "adapter")
    use_bnb_cpu_kernel(model)
    after = {name: fingerprint.base_identity(layer)[0] for name, layer in lora_layers(model)}
    assert all(torch.equal(before[name], after[name]) for name in before)
    load_adapter(model, tmp_path / "adapter", adapter_name="again")  # fingerprint check passes
    ids = tiny_models.input_ids()
    with torch.no_grad():
        first = model(ids).logits
        lorakit.set_active(model, ["again"], trainable=False)
        assert torch.equal(model(ids).logits, first)  # the same weights, the same kernel


def test_training_and_merging_a_repacked_model_are_refused_and_change_nothing():
    model = _with_adapter(_nf4_llama(), "lorakit")
    use_bnb_cpu_kernel(model)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        before = model(ids).logits
    model.train()
    with pytest.raises(UnsupportedQuantizedLayerError, match="inference only"):
        model(ids).logits.sum().backward()
    model.eval()
    with pytest.raises(UnsupportedQuantizedLayerError, match="cannot be read exactly"):
        lorakit.merge_and_unload(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_a_layer_the_kernel_cannot_take_is_named_before_any_is_repacked():
    model = _nf4_llama(intermediate_size=96)  # down_proj: 96 inputs, not whole 64-blocks
    with pytest.raises(lorakit.errors.UserError, match=r"down_proj.*scale block size 64"):
        use_bnb_cpu_kernel(model)
    assert not any(is_packed(module) for module in model.modules())
    with pytest.raises(lorakit.errors.UserError, match="has none"):
        use_bnb_cpu_kernel(tiny_models.llama())


def test_generate_with_the_kernel_matches_the_python_path(tmp_path, capsys):
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    tiny_models.save_llama_with_tokenizer(tmp_path / "model", tokenizer, intermediate_size=128)
    argv = ["generate", "hello there", "--model", str(tmp_path / "model"), "--raw"]
    argv += ["--max-new-tokens", "6", "--quantization", "nf4"]
    assert cli.main([*argv, "--bnb-cpu-kernel"]) == 0
    fast = capsys.readouterr().out
    from lorakit.commands.generate import generate_text
    from lorakit.models import load_model

    model, loaded_tokenizer = load_model(tmp_path / "model", quantization="nf4", progress=False)
    use_bnb_cpu_kernel(model.eval())
    expected = generate_text(model, loaded_tokenizer, "hello there", max_new_tokens=6, raw=True)
    assert fast == expected + "\n"


def test_the_option_without_a_4bit_quantization_is_refused_before_loading(tmp_path, capsys):
    argv = ["generate", "hi", "--model", str(tmp_path / "absent"), "--bnb-cpu-kernel"]
    assert cli.main([*argv, "--quantization", "int8"]) == 2
    assert "add --quantization nf4 or fp4" in capsys.readouterr().err


def test_a_serving_bank_loads_adapters_onto_the_repacked_model(tmp_path):
    """``lorakit serve --bnb-cpu-kernel``'s order: LoRA layers, repack, then adapters read at
    runtime (their fingerprints checked against the repacked codes): greedy tokens equal those
    of the same adapter injected into a repacked model."""
    from lorakit.commands.generate import engine_greedy
    from lorakit.serve import AdapterBank, prepare_for_serving
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry, ServedAdapters
    from lorakit.serve.sampling import SamplingParams

    trained = _with_adapter(_nf4_llama(), "lorakit")
    save_adapter(trained, tmp_path / "adapters" / "style")
    use_bnb_cpu_kernel(trained)
    trained.generation_config.eos_token_id = None
    expected = engine_greedy(trained, [5, 9, 14, 3], 6)

    served = _nf4_llama()
    served.generation_config.eos_token_id = None
    prepare_for_serving(served, SEVEN)
    use_bnb_cpu_kernel(served)
    bank = AdapterBank(served, max_rank=4, capacity=2)
    adapters = ServedAdapters(bank, AdapterRegistry(tmp_path / "adapters"), served)
    with Engine(served, bank, adapter_loader=adapters.read) as engine:
        ids, _, last = engine.generate([5, 9, 14, 3], "style", SamplingParams(max_tokens=6))
    assert last.finish_reason == "length" and ids == expected


def test_eval_with_the_kernel_scores_near_the_exact_path(tmp_path, jsonl, capsys):
    import json

    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_models.save_llama_with_tokenizer(
        tmp_path / "model", tokenizer, intermediate_size=128, pad_token_id=tokenizer.pad_token_id
    )
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(jsonl)]
    argv += ["--limit", "8", "--quantization", "nf4"]
    assert cli.main(argv) == 0
    exact = json.loads(capsys.readouterr().out)
    assert cli.main([*argv, "--bnb-cpu-kernel"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["examples"] == exact["examples"] == 8
    assert fast["loss"] != exact["loss"]  # the kernel ran: bfloat16 products
    assert abs(fast["loss"] - exact["loss"]) < 1e-2 * abs(exact["loss"])


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_writes_the_layer_as_loaded_and_leaves_it_packed(nested):
    """bitsandbytes' own save undoes the repack in place; without double quantization its undo
    kept the bfloat16 scales in the packed order (the layer then computed 4e-2 off, looked
    unpacked and merged with a wrong W0). Now the state dict holds what was loaded."""
    layer = _linear4bit(64, 256, nested=nested, quant_type="nf4")  # 4 scale blocks a row
    model = torch.nn.Sequential(layer).eval()
    loaded = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(3, 256)
    use_bnb_cpu_kernel(model)
    with torch.no_grad():
        before = model(x)
    saved = model.state_dict()
    assert is_packed(layer)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert saved.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(saved[key].view(torch.uint8), value.view(torch.uint8)), key
    with pytest.raises(UnsupportedQuantizedLayerError, match="cannot be read exactly"):
        from lorakit import quantized

        quantized.dequantized_weight(layer)
    with pytest.raises(lorakit.errors.UserError, match="load the weights first"):
        model.load_state_dict(saved)
