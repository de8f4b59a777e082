"""Review 37: base biases that a ``bias`` mode trains where accelerate offloaded their modules
(review 36b refused the forward of a LoRA layer over such a base: ``test_offload_review36b.py``).

1. ``bias="all"`` trains every bias of the model, the modules no adapter wraps too. Where only
   those are offloaded (no LoRA base is), nothing refused it: each call loaded their biases into
   new tensors, so training never changed them and the saved file held their stale values
   (every tensor of the file then differed from the non-offloaded run's). ``inject`` now
   refuses it before any change, naming the module and the ways out (``bias="lora_only"``
   there trains and saves the non-offloaded run's file byte for byte, which PEFT loads to its
   logits); a trained ``bias="all"`` file still loads there (PEFT's logits under no_grad, the
   same file saved again), and a training forward of a module whose bias it wrote into the
   offload map is refused.
2. ``inject`` with ``bias="lora_only"`` / ``"all"`` on an offloaded LoRA base was refused only
   at the first training forward: now at ``inject``, with that message and the module's path,
   the model left as it was (no module replaced, no flag changed).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from peft import PeftModel as PeftPeftModel

import lorakit
from lorakit.state import lora_layers
from tests import offloaded_models, tiny_models
from tests.offloaded_models import CPU, TOL, assert_same_files, logits_of

GPT2 = {"r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}
REFUSED = r"the bias of this {} trains .* accelerate offloaded the module"
MLPS_ON_DISK = {  # each block's MLP ("c_fc", "c_proj": no target) on "disk"; the rest on the CPU
    **{f"transformer.{name}": "cpu" for name in ("wte", "wpe", "ln_f")},
    **{f"transformer.h.{i}.{part}": "cpu" for i in (0, 1) for part in ("ln_1", "attn", "ln_2")},
    **{f"transformer.h.{i}.mlp": "disk" for i in (0, 1)},
    "lm_head": "cpu",
}


def _mlps_offloaded(how: str, folder) -> torch.nn.Module:
    """The tiny GPT-2 (seed 0), each block's MLP offloaded (``cpu_offload`` of each, or
    ``dispatch_model`` with ``MLPS_ON_DISK``): its biases on meta, the targets' not."""
    model = tiny_models.gpt2(seed=0)
    if how == "dispatch_model":
        dispatch_model(model, device_map=MLPS_ON_DISK, main_device="cpu", offload_dir=folder)
    else:
        for block in model.transformer.h:
            cpu_offload(block.mlp, execution_device=CPU)
    assert model.transformer.h[1].mlp.c_fc.bias.is_meta
    assert not model.transformer.h[1].attn.c_attn.bias.is_meta
    return model


@pytest.fixture(params=["cpu_offload", "dispatch_model"])
def mlps_offloaded(request, tmp_path):
    """A builder of the tiny GPT-2 with its MLPs offloaded one way (each its own folder)."""
    folders = iter(range(100))
    return lambda: _mlps_offloaded(request.param, tmp_path / f"offload{next(folders)}")


def _assert_refused_unchanged(model, config, module: str, kind: str) -> str:
    """``inject(model, config)`` refused naming ``module`` (a ``kind``) and the way out, the
    model as it was (the same module objects, flags and logits, no adapter); the message."""
    modules = list(model.modules())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    want = logits_of(model)
    with pytest.raises(ValueError, match=f"module '{module}': " + REFUSED.format(kind)) as caught:
        lorakit.inject(model, config)
    message = str(caught.value)
    assert "bias='none'" in message and message.endswith("Nothing was changed.")
    assert all(a is b for a, b in zip(model.modules(), modules, strict=True))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not lorakit.adapter_configs(model) and not list(lora_layers(model))
    assert torch.equal(logits_of(model), want)
    return message


# ---------------------------------------------------------------- 1. untargeted modules
def test_bias_all_where_only_untargeted_modules_are_offloaded_is_refused_at_inject(
    mlps_offloaded,
) -> None:
    config = lorakit.LoraConfig(**GPT2, bias="all")
    message = _assert_refused_unchanged(
        mlps_offloaded(), config, "transformer.h.0.mlp.c_fc", "Conv1D"
    )
    assert "bias='lora_only' where only modules no adapter targets are offloaded" in message


def _trained(model: torch.nn.Module, folder) -> torch.nn.Module:
    lorakit.inject(model, lorakit.LoraConfig(**GPT2, bias="lora_only"))
    tiny_models.randomize_adapters(model, std=0.3)
    tiny_models.sgd_steps(model, tiny_models.input_ids(), steps=2, lr=0.5)
    lorakit.save_adapter(model.eval(), folder)
    return model


def test_the_way_out_bias_lora_only_trains_as_on_the_plain_model(mlps_offloaded, tmp_path) -> None:
    plain = _trained(tiny_models.gpt2(seed=0), tmp_path / "plain")
    model = _trained(mlps_offloaded(), tmp_path / "offloaded")
    assert_same_files(tmp_path / "offloaded", tmp_path / "plain")  # (the biases trained)
    assert torch.equal(logits_of(model), logits_of(plain))
    peft_model = PeftPeftModel.from_pretrained(tiny_models.gpt2(seed=0), tmp_path / "offloaded")
    assert (logits_of(peft_model) - logits_of(plain)).abs().max().item() <= TOL


def test_a_bias_all_file_loads_there_and_its_training_forward_is_refused(
    mlps_offloaded, tmp_path
) -> None:
    plain = lorakit.inject(tiny_models.gpt2(seed=0), lorakit.LoraConfig(**GPT2, bias="all"))
    tiny_models.randomize_adapters(plain, std=0.3)
    tiny_models.sgd_steps(plain, tiny_models.input_ids(), steps=2, lr=0.5)  # every bias moves
    lorakit.save_adapter(plain.eval(), tmp_path / "adapter")
    peft_model = PeftPeftModel.from_pretrained(tiny_models.gpt2(seed=0), tmp_path / "adapter")
    model = mlps_offloaded()
    lorakit.load_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits_of(model), logits_of(plain))
    assert (logits_of(model) - logits_of(peft_model)).abs().max().item() <= TOL
    lorakit.save_adapter(model, tmp_path / "again")
    assert_same_files(tmp_path / "again", tmp_path / "adapter")
    ids = tiny_models.input_ids()
    with pytest.raises(ValueError, match=REFUSED.format("Conv1D")):
        model(ids, labels=ids)  # (it trained, and the MLP biases' steps were lost)
    assert torch.equal(logits_of(model), logits_of(plain))


# ---------------------------------------------------------------- 2. offloaded LoRA bases
@pytest.mark.parametrize(
    ("bias", "module", "kind"),
    [
        ("lora_only", "transformer.h.0.attn.c_attn", "Conv1D"),
        ("all", "transformer.h.0.ln_1", "LayerNorm"),
    ],
)
def test_a_bias_mode_on_an_offloaded_gpt2_is_refused_at_inject(bias, module, kind) -> None:
    model = tiny_models.gpt2(seed=0)
    cpu_offload(model, execution_device=CPU)
    _assert_refused_unchanged(model, lorakit.LoraConfig(**GPT2, bias=bias), module, kind)
    lorakit.inject(
        model, lorakit.LoraConfig(**GPT2, bias=bias, inference_mode=True)
    )  # (no training)


def test_bias_lora_only_on_a_disk_offloaded_llama_layer_is_refused_at_inject(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_models.LlamaForCausalLM(tiny_models.llama_config(attention_bias=True)).eval()
    offloaded_models.offload(model, "dispatch_model", tmp_path)  # (layer 1 on "disk")
    config = lorakit.LoraConfig(r=4, target_modules=["layers.1.self_attn.q_proj"], bias="lora_only")
    _assert_refused_unchanged(model, config, "model.layers.1.self_attn.q_proj", "Linear")
    lorakit.inject(model, config.replace(target_modules=["layers.0.self_attn.q_proj"]))  # in memory
