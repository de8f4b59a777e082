"""Review 37 of Gemma3n (and Reformer) on lorakit's fused and quantized paths.

1. The fused LoRA nodes (``FusedLoraLinear``, ``FusedQuantizedLoraLinear``) returned a view of
   their output, and autograd forbids changing in place a view made inside a custom Function:
   LoRA on Gemma3n's ``per_layer_model_projection`` (in ``all-linear``), which Gemma3n scales in
   place (``per_layer_projection *= scale``), raised in every training forward, on a float,
   int8-rows, int4-groups or nf4 base. The nodes now return a plain tensor (no copy): the loss
   and every LoRA gradient are peft 0.21.2's, in float64 on the float base, and on a quantized
   base those of peft on the float64 model holding the dequantized weights.
2. Gemma3n on a bitsandbytes base failed when training (transformers' ``altup.predict`` calls
   ``prediction_coefs.weight.data.clamp_`` on the packed codes). The AltUp coefficients are now
   put back in float after a bitsandbytes load, holding ``dequant(W0)``: the logits are those
   of the float64 model holding the dequantized weights, and the model trains (1).
3. An adapter an older lorakit saved on a layer lorakit now keeps float under int8-rows or
   int4-groups (Gemma3n's AltUp coefficients, Reformer's LSH ``query_key`` / ``value``) was
   refused with only "trained on an int8-rows base, this base is float32"; the message now says
   the layer is kept float and what to do, and ``allow_base_mismatch=True`` then computes
   ``W0 + s B A`` on the float layer.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lorakit
from lorakit.errors import BaseModelMismatchError
from lorakit.models import load_model
from lorakit.quantized import dequantized_weight, int4_groups, int8_rows, is_quantized
from lorakit.quantized.loading import quantize_loaded
from tests import tiny_models, tiny_tokenizer

VOCAB = 128
GEMMA3N = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=[128, 128],
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=8,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
    num_kv_shared_layers=0,
    laurel_rank=8,
    activation_sparsity_pattern=[0.0, 0.0],
)
REFORMER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    attention_head_size=16,
    attn_layers=["local", "lsh"],
    axial_pos_embds_dim=[32, 32],
    axial_pos_shape=[8, 8],
    max_position_embeddings=64,
    feed_forward_size=128,
    num_buckets=4,
    num_hashes=1,
    local_attn_chunk_length=8,
    lsh_attn_chunk_length=8,
    hash_seed=0,
    is_decoder=True,
    hidden_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0,
)
IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def _model(model_type: str = "gemma3n_text", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # (weights large enough for the quantization to matter; AltUp's
        for parameter in model.parameters():  # correct_output_scale, 0 at init, not 0)
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.05)
            else:
                parameter.add_(torch.randn_like(parameter), alpha=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def saved_gemma3n(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3n")
    _model(**GEMMA3N).save_pretrained(directory)
    tiny_tokenizer.build().save_pretrained(directory)
    return directory


def _projection_nodes(model) -> list[str]:
    """The autograd nodes that made ``per_layer_model_projection``'s output in a forward."""
    seen = []
    layer = model.get_submodule("model.per_layer_model_projection")
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.grad_fn.name()))
    model(IDS, labels=IDS, use_cache=False).loss.backward()
    handle.remove()
    return seen


def _train(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and every LoRA gradient of one training forward (keys without peft's prefix)."""
    model.train()
    loss = model(IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    grads = {
        name.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for name, p in model.named_parameters()
        if "lora_" in name
    }
    return loss.detach(), grads


def _peft_reference(float_model, ours):
    """peft (all-linear) on a float64 copy of ``float_model`` holding the adapters of ``ours``
    and the weights its linear layers compute with: a quantized layer's dequantized weight
    (an ``nn.Linear``'s own: bitsandbytes' AltUp coefficients hold ``dequant(W0)``)."""
    reference = copy.deepcopy(float_model).double()
    for name, layer in ours.named_modules():
        if ".lora_" not in name and (is_quantized(layer) or type(layer) is nn.Linear):
            weight = dequantized_weight(layer) if is_quantized(layer) else layer.weight
            target = reference.get_submodule(name.removesuffix(".base_layer"))
            target.weight = nn.Parameter(weight.detach().double())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(reference, config)
    state = {
        f"base_model.model.{key}": value.double()
        for key, value in ours.state_dict().items()
        if "lora_" in key
    }
    missing = set(state) - set(theirs.state_dict())
    assert not missing, missing
    theirs.load_state_dict(state, strict=False)
    return theirs


def _inject(model) -> None:
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tiny_models.randomize_adapters(model, std=0.2)


def _assert_grads_match(ours, theirs, tolerance: float) -> None:
    (our_loss, our_grads), (their_loss, their_grads) = ours, theirs
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 10
    assert abs(our_loss.double() - their_loss) <= tolerance * their_loss.abs()
    unused = {name for name, grad in their_grads.items() if grad is None}
    # (training reads ``correction_coefs.weight`` itself, by-passing any adapter on it)
    assert unused == {name for name, grad in our_grads.items() if grad is None}
    assert all("correction_coefs" in name for name in unused)
    for name, want in their_grads.items():
        if name in unused:
            continue
        got = our_grads[name].double()
        assert (got - want).abs().max() <= tolerance * want.abs().max().clamp(min=1e-6), name
    projection = [g for n, g in their_grads.items() if "per_layer_model_projection" in n]
    assert len(projection) == 2 and all(g.abs().max() > 0 for g in projection)


# ------------------------------------------------------------- 1. in place on the fused output
def test_gemma3n_all_linear_trains_on_the_float_base_as_peft():
    float_model = _model(**GEMMA3N).double()
    ours = copy.deepcopy(float_model)
    _inject(ours)
    theirs = _peft_reference(float_model, ours)
    assert _projection_nodes(ours) == ["FusedLoraLinearBackward"]  # (the fused path)
    ours.zero_grad()
    _assert_grads_match(_train(ours), _train(theirs), 1e-10)


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups", "nf4"])
def test_gemma3n_all_linear_trains_on_a_quantized_base(saved_gemma3n, quantization):
    """The fused quantized node's gradients: the plain formula's (``plain_path``: the base's own
    forward and backward plus ``s B A x``, by autograd) on the same base within float32 rounding,
    and peft's on the float64 model holding the dequantized weights within the kernels'
    rounding (bitsandbytes computes in float32; int8-rows / int4-groups in bfloat16)."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    float_model, _ = load_model(saved_gemma3n, progress=False)
    ours, _ = load_model(saved_gemma3n, quantization=quantization, progress=False)
    assert is_quantized(ours.get_submodule("model.per_layer_model_projection"))
    _inject(ours)
    plain, theirs = copy.deepcopy(ours), _peft_reference(float_model, ours)
    assert _projection_nodes(ours) == ["FusedQuantizedLoraLinearBackward"]
    ours.zero_grad()
    got = _train(ours)
    with lorakit.fast.plain_path():
        _assert_grads_match(got, _train(plain), 1e-4)
    want = _train(theirs)
    if quantization == "nf4":
        _assert_grads_match(got, want, 1e-5)
    else:
        flat = [
            torch.cat([g.double().flatten() for g in grads.values() if g is not None])
            for grads in (got[1], want[1])
        ]
        assert (flat[0] - flat[1]).norm() <= 5e-2 * flat[1].norm()
        assert abs(got[0].double() - want[0]) <= 1e-2 * want[0].abs()


@pytest.mark.parametrize("base", ["float", "int8-rows"])
def test_a_fused_node_output_changed_in_place_backpropagates_the_formula(base):
    """The node's output is no view: ``out *= 3`` (Gemma3n's ``per_layer_projection *= scale``)
    works, and the gradients are the float64 formula's for ``h = 3 (x W0^T + b + c B A x)``."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, requires_grad=True)
    lora_a = (0.3 * torch.randn(4, 64)).requires_grad_(True)
    lora_b = (0.3 * torch.randn(48, 4)).requires_grad_(True)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    if base == "float":
        out = lorakit.fast.FusedLoraLinear.apply(x, weight, bias, lora_a, lora_b, 0.5, 0, 0, False)
    else:
        layer = int8_rows.Int8RowsLinear.from_weight(weight, bias)
        out = lorakit.fast.FusedQuantizedLoraLinear.apply(x, layer, lora_a, lora_b, 0.5, 0, 0)
        weight = dequantized_weight(layer)
    assert not out._is_view()
    out *= 3.0
    upstream = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * upstream).sum(), (x, lora_a, lora_b))
    g = 3.0 * upstream.double().reshape(-1, 48)  # dL/dh before the scaling, (N, d)
    rows, a, b = (
        x.detach().double().reshape(-1, 64),
        lora_a.detach().double(),
        lora_b.detach().double(),
    )
    want = (
        (g @ (weight.double() + 0.5 * b @ a)).reshape(2, 5, 64),  # dL/dx
        0.5 * (g @ b).T @ rows,  # dL/dA
        0.5 * g.T @ (rows @ a.T),  # dL/dB
    )
    for got, expected in zip(grads, want, strict=True):
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_gemma3n_dora_on_the_projection_trains_as_peft():
    """DoRA's fused node (``FusedDoraLinear``) returns no view either: Gemma3n's in-place scaling
    of ``per_layer_model_projection``'s output trains, with peft's float64 loss and gradients."""
    float_model = _model(**GEMMA3N).double()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["per_layer_model_projection"]}
    ours = copy.deepcopy(float_model)
    lorakit.inject(ours, lorakit.LoraConfig(**config, use_dora=True))
    tiny_models.randomize_adapters(ours, std=0.2)
    theirs = peft.get_peft_model(
        copy.deepcopy(float_model), peft.LoraConfig(**config, use_dora=True)
    )
    state = {f"base_model.model.{k}": v for k, v in ours.state_dict().items() if "lora_" in k}
    assert len(state) == 3 and not set(state) - set(theirs.state_dict())
    theirs.load_state_dict(state, strict=False)
    assert _projection_nodes(ours) == ["FusedDoraLinearBackward"]  # (the fused DoRA path)
    ours.zero_grad()
    (our_loss, our_grads), (their_loss, their_grads) = _train(ours), _train(theirs)
    assert abs(our_loss - their_loss) <= 1e-10 * their_loss.abs()
    assert our_grads.keys() == their_grads.keys()
    for name, want in their_grads.items():
        assert want.abs().max() > 0, name
        assert (our_grads[name] - want).abs().max() <= 1e-10 * want.abs().max(), name


# ------------------------------------------------------------ 2. AltUp float under bitsandbytes
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_gemma3n_on_bitsandbytes_keeps_the_altup_coefficients_float(saved_gemma3n, quantization):
    bnb = pytest.importorskip("bitsandbytes")
    float_model, _ = load_model(saved_gemma3n, progress=False)
    model, _ = load_model(saved_gemma3n, quantization=quantization, progress=False)
    reference = copy.deepcopy(float_model).double()
    kept = 0
    for name, layer in model.named_modules():
        if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight = dequantized_weight(layer).double()
            reference.get_submodule(name).weight = nn.Parameter(weight)
        elif name.endswith(("altup.prediction_coefs", "altup.correction_coefs")):
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
            original = float_model.get_submodule(name).weight
            # dequant(W0): within NF4's / int8's rounding of the float weight, not equal to it
            assert (layer.weight - original).abs().max() <= 0.14 * original.abs().max()
            reference.get_submodule(name).weight = nn.Parameter(layer.weight.double())
            kept += 1
    assert kept == 4
    with torch.no_grad():
        got, want = model(IDS).logits.double(), reference(IDS).logits
    bound = 1e-4 if quantization == "nf4" else 5e-2  # (LLM.int8 rounds the activations too)
    assert (got - want).abs().max() <= bound * want.abs().max()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.train()
    model(IDS, labels=IDS, use_cache=False).loss.backward()  # (the in-place clamp works)


# ----------------------------------------------------- 3. an older adapter on a layer kept float
CASES = {
    "gemma3n": (
        "gemma3n_text",
        GEMMA3N,
        ["prediction_coefs", "correction_coefs"],
        "model.layers.0.altup.correction_coefs",
        "Gemma3nTextAltUp",
    ),
    "reformer": (
        "reformer",
        REFORMER,
        r".*layers\.1\.attention\.self_attention\.(query_key|value)",  # (LSH's, not local's)
        "reformer.encoder.layers.1.attention.self_attention.query_key",
        "LSHSelfAttention",
    ),
}


@pytest.mark.parametrize(  # (AltUp's sizes are no multiples of 32: never int4-groups)
    ("case", "quantization"),
    [("gemma3n", "int8-rows"), ("reformer", "int8-rows"), ("reformer", "int4-groups")],
)
def test_an_older_adapter_on_a_layer_now_kept_float_says_so(tmp_path, case, quantization):
    model_type, kwargs, targets, layer, reader = CASES[case]
    backend = int8_rows if quantization == "int8-rows" else int4_groups
    older = _model(model_type, **kwargs)
    backend.quantize_linears(older, keep=[])  # (what an older lorakit stored: that layer too)
    assert is_quantized(older.get_submodule(layer))
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    lorakit.inject(older, config)
    tiny_models.randomize_adapters(older, std=0.2)
    lorakit.save_adapter(older, tmp_path / "adapter")
    model = _model(model_type, **kwargs)
    quantize_loaded(model, quantization, None)
    assert type(model.get_submodule(layer)) is nn.Linear
    reference = copy.deepcopy(model)
    with pytest.raises(BaseModelMismatchError) as caught:
        lorakit.load_adapter(model, tmp_path / "adapter")
    message = str(caught.value)
    assert f"trained on an {quantization} base, this base is float32" in message
    assert (
        f"lorakit now keeps {layer} float on an {quantization} base (transformers' {reader} "
        "reads its weight itself), where the older lorakit that saved this adapter quantized "
        "it: train the adapter again on this base, or load it anyway with "
        "allow_base_mismatch=True" in message
    )
    assert all(type(m).__name__ != "LoraLinear" for m in model.modules())  # (unchanged)
    # the way out given: loaded anyway, the float layer computes W0 + s B A (float64 merge)
    with pytest.warns(UserWarning, match="lorakit now keeps"):
        lorakit.load_adapter(model, tmp_path / "adapter", allow_base_mismatch=True)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key in tensors:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
            target = reference.get_submodule(name)
            merged = target.weight.double() + 2.0 * b @ a  # W0 + (alpha / r) B A, float64
            target.weight = nn.Parameter(merged.float())
    with torch.no_grad():
        got, want = model(IDS).logits.double(), reference(IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
