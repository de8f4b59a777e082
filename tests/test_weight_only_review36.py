"""Review 36 of lorakit's weight-only bases (``int8-rows``, ``int4-groups``) and export's hint.

1. transformers' code for some models reads a linear layer's ``weight`` itself, which a
   weight-only layer does not hold: Mamba's ``self.dt_proj.weight @ x`` (every forward) and,
   when training, its fused path's ``x_proj`` / ``dt_proj`` / ``out_proj`` weights; the heads'
   ``hidden.to(self.lm_head.weight.dtype)`` (Mamba, FalconMamba, Mamba2, xLSTM); the Mamba-2
   mixers' ``out_proj`` (training); Jamba's ``dt_proj``; RWKV's in-place rescaling; Ergo's
   ``o_proj.weight.dtype``; Bloom's ``slow_but_exact`` slices; HunYuan's router; Gemma3n's
   AltUp coefficients; LayoutLMv3's relative-position tables. Every forward (or training step)
   raised ``AttributeError``. Those layers now stay float (``weight_only.WEIGHT_READS``): each
   model runs, each quantized layer within bfloat16 rounding of ``F.linear`` on its dequantized
   weight in float64, the logits close to the float64 model holding the dequantized weights.
2. bitsandbytes: transformers quantizes Mamba's ``dt_proj`` and its ``weight @ x`` fails on
   the packed codes; the load is refused naming the model type, the layer and the way out.
   FalconMamba, whose code guards that read, loads and runs as before.
3. A weight-only layer's output changed in place when training (Gemma3n's ``projection *=
   scale``) raised (a view made inside the autograd Function); the gradient now is the float64
   ``dL/dx = dL/dy W0``.
4. ``lorakit export MODEL --adapter DIR`` with an adapter trained on a quantized base advised
   ``--quantization``, an option export lacks; it now names ``lorakit merge --quantization``,
   and following it (or ``--allow-base-mismatch``) exports ``W0 + s B A``. eval / generate keep
   "pass --quantization".
5. "trained on an int4-groups base" (was "a int4-groups").
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.io.fingerprint import describe_difference
from lorakit.models import load_model
from lorakit.quantized.int8_rows import Int8RowsLinear
from lorakit.quantized.loading import quantize_loaded
from lorakit.quantized.weight_only import WeightOnlyLinear
from tests import gguf_helpers, tiny_models, tiny_tokenizer
from tests.cli_runs import run_cli

VOCAB = 128
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
MAMBA = dict(vocab_size=320, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2)
# model type, config, task, the layers that must stay float (by name ending)
FAMILIES = {
    "mamba2": (
        "mamba2",
        dict(MAMBA, vocab_size=VOCAB, num_heads=8, head_dim=16, n_groups=1, chunk_size=8),
        "lm",
        ("mixer.out_proj", "lm_head"),
    ),
    "jamba": (
        "jamba",
        dict(
            SMALL,
            num_experts=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=16,
            mamba_dt_rank=8,
            use_mamba_kernels=False,
        ),
        "lm",
        ("dt_proj",),
    ),
    "xlstm": (
        "xlstm",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            embedding_dim=64,
            num_heads=4,
            num_blocks=2,
            qk_dim_factor=1.0,
            chunk_size=16,
        ),
        "lm",
        ("lm_head",),
    ),
    "rwkv": (
        "rwkv",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            attention_hidden_size=64,
            intermediate_size=128,
            rescale_every=1,
        ),
        "lm",
        ("attention.output", "feed_forward.value"),
    ),
    "ergo": (
        "ergo",
        dict(
            SMALL,
            first_dense_intermediate_size=128,
            moe_intermediate_size=32,
            shared_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
        "lm",
        ("self_attn.o_proj",),
    ),
    "bloom": (
        "bloom",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            n_layer=2,
            n_head=4,
            pretraining_tp=2,
            slow_but_exact=True,
        ),
        "lm",
        ("self_attention.dense", "mlp.dense_4h_to_h"),
    ),
    "hunyuan": ("hunyuan_v1_moe", dict(SMALL, num_experts=2, moe_topk=1), "lm", ("gate.wg",)),
    "gemma3n": (
        "gemma3n_text",
        dict(
            SMALL,
            intermediate_size=[128, 128],
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=16,
            num_kv_shared_layers=0,
            laurel_rank=8,
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        "lm",
        ("altup.prediction_coefs", "altup.correction_coefs"),
    ),
    "layoutlmv3": (
        "layoutlmv3",
        dict(
            vocab_size=VOCAB,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            coordinate_size=16,
            shape_size=16,
            visual_embed=False,
            max_position_embeddings=64,
        ),
        "cls",
        ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),
    ),
}


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _family(name: str) -> nn.Module:
    model_type, kwargs, task, _ = FAMILIES[name]
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    return auto.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


def _inputs(vocab: int, bbox: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids} | ({"bbox": torch.zeros(2, 9, 4, dtype=torch.long)} if bbox else {})


def _check_against_dequantized(model, float_model, inputs, reference_dtype=torch.float64):
    """Each weight-only layer of ``model`` on its own inputs: within bfloat16 rounding of
    ``F.linear`` on its dequantized weight in float64 (error <= 2^-8 (|x| |W0|^T + |y|)); the
    logits close to ``float_model`` holding those dequantized weights, run in
    ``reference_dtype`` (float32 where a kernel takes no float64: grouped MoE experts)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    seen = {}

    def record(name):
        def hook(module, args, out) -> None:  # (returns None: the output stays as it is)
            seen.setdefault(name, (args[0], out.clone()))  # (before an in-place change)

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    with torch.no_grad():
        logits = model(**inputs).logits
    for handle in handles:
        handle.remove()
    assert layers and set(seen) == set(layers)
    for name, (x, y) in seen.items():
        w0, x = layers[name].dequantized().double(), x.double()
        bias = layers[name].bias
        want = F.linear(x, w0, None if bias is None else bias.double())
        bound = 2**-8 * (x.abs() @ w0.abs().T + want.abs()) + 1e-12
        assert ((y.double() - want).abs() <= bound).all(), name
    reference = copy.deepcopy(float_model).to(reference_dtype)
    for name, layer in layers.items():
        weight = layer.dequantized().to(reference_dtype)
        reference.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    with torch.no_grad():
        want = reference(**inputs).logits.double()
    assert (logits.double() - want).abs().max() <= 2e-2 * want.abs().max()


def _assert_kept(model, float_model, endings) -> int:
    """The layers named by ``endings`` are ``nn.Linear`` with their original weights."""
    kept = [n for n, _ in float_model.named_modules() if n.endswith(endings)]
    for name in kept:
        assert type(model.get_submodule(name)) is nn.Linear, name
        assert torch.equal(model.get_submodule(name).weight, float_model.get_submodule(name).weight)
    return len(kept)


def _train_step(model, inputs) -> None:
    """A training forward and backward (LoRA on the first quantized layer): finite, non-zero
    gradients on the adapter."""
    target = next(n for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=[target.rsplit(".", 1)[-1]]))
    tiny_models.randomize_adapters(model)
    model.train()
    extra = {} if "bbox" in inputs else {"use_cache": False}
    model(**inputs, **extra).logits.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- 1. layers read as weights
@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba"])
def test_mamba_loads_runs_and_trains_on_a_weight_only_base(tmp_path, kind, quantization):
    _saved_mamba(tmp_path, kind)
    model, _ = load_model(tmp_path, quantization=quantization, progress=False)
    float_model, _ = load_model(tmp_path, progress=False)
    _check_against_dequantized(model, float_model, _inputs(320))
    endings = ("x_proj", "dt_proj", "out_proj", "lm_head") if kind == "mamba" else ("dt_proj",)
    assert _assert_kept(model, float_model, endings) == (7 if kind == "mamba" else 2)
    assert isinstance(model.backbone.layers[0].mixer.in_proj, WeightOnlyLinear)
    _train_step(model, _inputs(320))  # (Mamba's fused path reads x/dt/out_proj when training)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_other_families_reading_a_weight_run_on_int8_rows(name):
    float_model, model = _family(name), _family(name)
    quantize_loaded(model, "int8-rows", None)  # what load_model does after from_pretrained
    assert _assert_kept(model, float_model, FAMILIES[name][3])  # (RWKV's forward rescales)
    inputs = _inputs(VOCAB, bbox=name == "layoutlmv3")
    dtype = torch.float32 if name in ("ergo", "hunyuan") else torch.float64
    _check_against_dequantized(model, float_model, inputs, dtype)
    _train_step(model, inputs)


# ---------------------------------------------------------------- 2. bitsandbytes
def _saved_mamba(directory, kind: str):
    """A tiny random Mamba (``kind`` "mamba") or FalconMamba saved with a tokenizer."""
    config, cls = (
        (MambaConfig, MambaForCausalLM)
        if kind == "mamba"
        else (FalconMambaConfig, FalconMambaForCausalLM)
    )
    torch.manual_seed(0)
    model = cls(config(**MAMBA)).eval()
    model.save_pretrained(directory)
    tiny_tokenizer.build().save_pretrained(directory)
    return model


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_mamba_on_bitsandbytes_is_refused_at_load(tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    _saved_mamba(tmp_path, "mamba")
    with pytest.raises(UserError) as caught:
        load_model(tmp_path, quantization=quantization, progress=False)
    message = str(caught.value)
    assert f"--quantization {quantization}" in message and "model type 'mamba'" in message
    assert "backbone.layers.0.mixer.dt_proj" in message and "MambaMixer" in message
    assert "choose int8-rows or int4-groups" in message


def test_falcon_mamba_on_nf4_runs_as_transformers_loads_it(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    float_model = _saved_mamba(tmp_path, "falcon_mamba")
    model, _ = load_model(tmp_path, quantization="nf4", progress=False)
    reference = copy.deepcopy(float_model).double()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(name.endswith("dt_proj") for name, _ in layers)  # (guarded: _is_quantized)
    for name, layer in layers:
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        reference.get_submodule(name).weight = nn.Parameter(weight.double())
    with torch.no_grad():
        got, want = model(**_inputs(320)).logits.double(), reference(**_inputs(320)).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# ---------------------------------------------------------------- 3. in place, training
def test_a_weight_only_output_changed_in_place_backpropagates_through_w0():
    torch.manual_seed(0)
    layer = Int8RowsLinear.from_weight(torch.randn(48, 64))
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = layer(x)
    out *= 3.0  # (Gemma3n's ``per_layer_projection *= scale``)
    upstream = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()
    want = 3.0 * upstream.double() @ layer.dequantized().double()
    assert torch.allclose(x.grad.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 4 and 5. export, messages
def _adapter_on_quantized_llama(tmp_path, quantization: str):
    model_dir, adapter = tmp_path / "llama", tmp_path / f"adapter-{quantization}"
    if not model_dir.exists():
        tiny_models.save_llama_with_tokenizer(model_dir, tiny_tokenizer.build())
    model, _ = load_model(model_dir, quantization=quantization, progress=False)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, adapter)
    return model_dir, adapter


def _merged_down_proj(model_dir, adapter) -> np.ndarray:
    """float64 ``W + (alpha / r) B A`` of layer 0's down_proj: the float base's weight."""
    base = load_file(model_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    a, b = (tensors[f"{prefix}.lora_{x}.weight"].double() for x in "AB")
    return (base.double() + 8 / 4 * b @ a).numpy()


def test_export_names_the_merge_that_loads_a_quantized_base_and_it_works(tmp_path, capsys):
    model_dir, adapter = _adapter_on_quantized_llama(tmp_path, "int4-groups")
    output = tmp_path / "out.gguf"
    export = ["export", model_dir, "--adapter", adapter, "--format", "gguf", "--type", "f32"]
    code, _, err = run_cli(capsys, *export, "--output", output)
    assert code == 2 and not output.exists()
    merge = f"lorakit merge --model {model_dir} --adapter {adapter} --quantization int4-groups"
    assert f"({merge} --output MERGED_DIR), then export MERGED_DIR." in err
    assert "pass --quantization" not in err and "--allow-base-mismatch" in err
    assert "trained on an int4-groups base, this base is float32" in err
    # the way out given: merge on the int4-groups base, then export the merged directory
    merged = tmp_path / "merged"
    argv = ["merge", "--model", model_dir, "--adapter", adapter, "--quantization", "int4-groups"]
    assert run_cli(capsys, *argv, "--output", merged)[0] == 0
    assert (
        run_cli(capsys, "export", merged, "--format", "gguf", "--type", "f32", "--output", output)[
            0
        ]
        == 0
    )
    saved = load_file(merged / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    np.testing.assert_array_equal(
        gguf_helpers.reader_tensors(output)["blk.0.ffn_down.weight"], saved.double().numpy()
    )
    # or --allow-base-mismatch: merged into the float base as it is
    code, _, _ = run_cli(
        capsys, *export, "--allow-base-mismatch", "--overwrite", "--output", output
    )
    assert code == 0
    got = gguf_helpers.reader_tensors(output)["blk.0.ffn_down.weight"]
    np.testing.assert_allclose(got, _merged_down_proj(model_dir, adapter), rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantization", ["int4-groups", "int8-rows"])
def test_eval_and_generate_keep_their_hint_with_an_article(tmp_path, quantization):
    from lorakit.commands.eval import load_model_and_adapter

    model_dir, adapter = _adapter_on_quantized_llama(tmp_path, quantization)
    with pytest.raises(BaseModelMismatchError) as caught:
        load_model_and_adapter(str(model_dir), str(adapter))
    message = str(caught.value)
    assert f"the adapter was trained on an {quantization} base, this base is float32" in message
    assert message.endswith(
        f" It was trained on a quantized base: pass --quantization {quantization}."
    )


def test_the_format_mismatch_of_an_older_fingerprint_takes_its_article():
    weight = torch.zeros(4, 4)
    for stored, article in (("int8-rows", "an"), ("int4-groups", "an"), ("bnb-nf4-dq", "a")):
        reason = describe_difference({"dtype": stored, "shape": [4, 4]}, weight)
        assert reason.startswith(
            f"the adapter was trained on {article} {stored} base, this base is float32"
        )
