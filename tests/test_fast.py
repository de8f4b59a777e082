"""The fused LoRA linear path (``lorakit.fast``) against independent references: float64
gradcheck, the plain formula in float64 with the same dropout mask, the unfused path in fp32
(1e-6 relative), the real ``peft`` package for a whole training step, and dropout statistics."""

from __future__ import annotations

import math
import threading

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import fast
from lorakit.fast.dropout import (
    DROPOUT_LEVELS,
    SPARSE_LEVELS,
    drop_levels,
    dropped_positions,
    keep_mask,
    new_seed,
)
from lorakit.state import lora_layers
from tests import tiny_models

torch.set_default_dtype(torch.float32)


def _layer(dtype=torch.float32, dropout=0.0, bias=True, in_f=12, out_f=10, r=3, alpha=6.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    config = lorakit.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    if bias:
        model[0].base_layer.bias.requires_grad_(True)  # as with bias="all": its gradient too
    return model[0].train()


def _reference(x, weight, bias, lora_A, lora_B, scale, mask=None, p=0.0):
    """The plain formula in float64: x W^T + b + s B A (x * mask / (1 - p))."""
    x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
    kept = x if mask is None else x * mask / (1 - p)
    out = x @ weight.T + (kept @ lora_A.T * scale) @ lora_B.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("drop", [0, 3277, SPARSE_LEVELS, 19661])  # steps kept; redrawn; bits
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradcheck_float64(drop, fan_in_fan_out):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    weight = rand(5, 4, grad=False) if fan_in_fan_out else rand(4, 5, grad=False)
    inputs = (
        rand(2, 3, 5),
        weight,
        rand(4),
        rand(2, 5),
        rand(4, 2),
        1.7,
        drop,
        1234,
        fan_in_fan_out,
    )
    assert torch.autograd.gradcheck(fast.FusedLoraLinear.apply, inputs)


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.1, 0.3])  # none; steps kept; redrawn; bits
def test_matches_float64_formula_with_the_same_mask(dropout):
    layer = _layer(torch.float64, dropout=dropout)
    x = torch.randn(4, 7, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FusedLoraLinearBackward"
    torch.manual_seed(11)
    levels = drop_levels(dropout)
    mask = keep_mask((28, 12), levels, new_seed(), x.device).view(4, 7, 12) if levels else None
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bias = layer.base_layer.bias
    x_ref = x.detach().clone().requires_grad_()
    ref = _reference(
        x_ref,
        layer.base_layer.weight,
        bias,
        A,
        B,
        layer.scalings["default"],
        mask,
        levels / DROPOUT_LEVELS,
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B, bias), grad)
    want = torch.autograd.grad(ref, (x_ref, A, B, bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_fp32_equals_unfused_path(grad_enabled):
    layer = _layer(torch.float32)
    x = torch.randn(3, 16, 12, requires_grad=grad_enabled)
    params = [x, layer.base_layer.bias, *layer.adapter_parameters("default")]
    with torch.set_grad_enabled(grad_enabled):
        out = layer(x)
        with fast.plain_path():
            plain = layer(x)
    assert (type(out.grad_fn).__name__ == "FusedLoraLinearBackward") == grad_enabled
    assert (out - plain).abs().max() <= 1e-6 * plain.abs().max()
    if grad_enabled:
        grad = torch.randn_like(out)
        for g, w in zip(
            torch.autograd.grad(out, params, grad),
            torch.autograd.grad(plain, params, grad),
            strict=True,
        ):
            assert (g - w).abs().max() <= 1e-6 * w.abs().max()


def test_whole_training_step_matches_peft():
    fields = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lorakit.inject(tiny_models.llama(dtype=torch.float64), lorakit.LoraConfig(**fields))
    theirs = peft.get_peft_model(tiny_models.llama(dtype=torch.float64), peft.LoraConfig(**fields))
    tiny_models.randomize_adapters(ours, std=0.3)
    theirs.load_state_dict(
        {"base_model.model." + k: v for k, v in ours.state_dict().items() if "lora_" in k},
        strict=False,
    )
    ids = tiny_models.input_ids(batch=2, length=10)
    ours.train()(ids, labels=ids).loss.backward()
    theirs.train()(input_ids=ids, labels=ids).loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            want = theirs_grads["base_model.model." + name]
            assert (parameter.grad - want).abs().max() <= 1e-10 * want.abs().max(), name


@pytest.mark.parametrize("branch_dropout", [0.1, 0.2])
def test_dropout_rate_independence_and_expectation(branch_dropout):
    levels = drop_levels(0.05)
    mask = keep_mask((1000, 1000), levels, seed=7, device=torch.device("cpu"))
    drop_rate = 1 - mask.float().mean().item()
    assert abs(drop_rate - 0.05) < 5 * (0.05 * 0.95 / 1e6) ** 0.5  # 5 standard deviations
    assert torch.equal(mask, keep_mask((1000, 1000), levels, 7, torch.device("cpu")))
    other = keep_mask((1000, 1000), levels, 8, torch.device("cpu"))
    both_dropped = (~mask & ~other).float().mean().item()  # independent: about p^2
    assert abs(both_dropped - 0.05**2) < 5 * (0.05**2 / 1e6) ** 0.5
    # Same semantics as F.dropout (the plain path): same mean and spread of the branch output.
    layer = _layer(torch.float64, dropout=branch_dropout, bias=False)  # positions; lanes
    x = torch.randn(64, 12, dtype=torch.float64)
    torch.manual_seed(5)
    with torch.no_grad():
        fused = torch.stack([layer(x) for _ in range(300)])
        with fast.plain_path():
            plain = torch.stack([layer(x) for _ in range(300)])
        exact = layer.eval()(x)
    spread = plain.std(0).mean()
    assert (fused.mean(0) - exact).abs().mean() < 0.15 * spread
    assert 0.9 < (fused.std(0).mean() / spread).item() < 1.1


@pytest.mark.parametrize("dropout", [0.05, 0.1, 0.3])
def test_saves_x_once_and_nothing_full_size_in_bf16(dropout):
    """q, k, v share their input: the fused nodes keep that one tensor, nothing (N, k) else
    (each dropout mask as N k / 8 bytes of bits; at p = 0.05 the int16 steps between its
    drops, about p N k of them; at 1/16 < p <= 1/8 nothing, the masks are drawn again from
    their seeds), and no fp32 copy of the bf16 activation, even with dropout and fp32
    adapters."""
    model = nn.ModuleDict({n: nn.Linear(64, 48) for n in "qkv"}).to(torch.bfloat16)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=list("qkv"), lora_dropout=dropout)
    lorakit.inject(model, config)
    assert model["q"].lora_A["default"].weight.dtype == torch.float32
    model.train()
    x = torch.randn(8, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved[tensor.data_ptr()] = (tensor.dtype, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sum(model[n](x).float().sum() for n in "qkv")
    assert saved.pop(x.data_ptr()) == (torch.bfloat16, x.numel())
    masks = [key for key, (dtype, _) in saved.items() if dtype == torch.uint8]
    bits = [] if dropout <= 1 / 8 else [(torch.uint8, x.numel() // 8)] * 3
    assert [saved.pop(key) for key in masks] == bits
    steps = [saved.pop(key) for key, (dtype, _) in list(saved.items()) if dtype == torch.int16]
    assert len(steps) == (3 if dropout <= 1 / 16 else 0)
    for _, count in steps:  # one per drop: 2 bytes each, fewer bytes than N k / 8 bits
        assert abs(count - dropout * x.numel()) < 5 * (dropout * x.numel()) ** 0.5
        assert 2 * count < x.numel() // 8
    assert all(numel == 8 * 32 * 4 and dtype == torch.bfloat16 for dtype, numel in saved.values())
    out.backward()
    assert model["q"].lora_A["default"].weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_base_fp32_adapters_close_to_float64_formula(dropout):
    """bf16 activations, fp32 adapters: output within bf16 rounding; the fp32 gradient of A is
    accumulated in fp32 (close to float64), that of B from the bf16 rank-r product u."""
    layer = _layer(torch.bfloat16, dropout=dropout, in_f=64, out_f=48)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    A, B = layer.adapter_parameters("default")
    assert A.dtype == torch.float32
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    levels = drop_levels(dropout)
    mask = keep_mask((64, 64), levels, new_seed(), x.device).view(4, 16, 64) if levels else None
    base = layer.base_layer
    ref = _reference(
        x, base.weight, base.bias, A, B, layer.scalings["default"], mask, levels / DROPOUT_LEVELS
    )
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B), grad)
    want = torch.autograd.grad(ref, (x, A, B), grad.double())
    tolerances = (2e-2, 1e-5, 1e-2)  # x: bf16 result; A: fp32 accumulation; B: bf16 u
    for g, w, tolerance in zip(got, want, tolerances, strict=True):
        assert (g.double() - w).abs().max() <= tolerance * w.abs().max()
    assert got[1].dtype == got[2].dtype == torch.float32


def _grad_fn_name(layer, x):
    return type(layer(x).grad_fn).__name__


def test_falls_back_to_the_plain_path_where_it_cannot_apply():
    layer = _layer()
    x = torch.randn(2, 12, requires_grad=True)
    assert _grad_fn_name(layer, x) == "FusedLoraLinearBackward"
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert _grad_fn_name(layer, x) != "FusedLoraLinearBackward"
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _grad_fn_name(layer, x) != "FusedLoraLinearBackward"
    layer.base_layer.weight.requires_grad_(True)
    assert _grad_fn_name(layer, x) != "FusedLoraLinearBackward"
    layer.base_layer.weight.requires_grad_(False)
    layer.add_adapter("second", 2, 4.0, 0.0, False, False, torch.float32)
    layer.active_adapters = ("default", "second")
    out = layer(x)
    assert type(out.grad_fn).__name__ != "FusedLoraLinearBackward"
    with torch.no_grad():  # inference takes every active adapter in one fused pass
        fused = layer(x)
        with fast.plain_path():
            plain = layer(x)
    assert (fused - plain).abs().max() <= 1e-6 * plain.abs().max()
    torch.testing.assert_close(out.detach(), plain, rtol=1e-6, atol=1e-6)


def test_plain_path_holds_only_in_its_block_and_its_thread():
    layer = _layer()
    x = torch.randn(2, 12, requires_grad=True)
    seen = {}
    with fast.plain_path():
        worker = threading.Thread(target=lambda: seen.update(other=_grad_fn_name(layer, x)))
        worker.start()
        worker.join()
        seen["inside"] = _grad_fn_name(layer, x)
    assert seen == {"other": "FusedLoraLinearBackward", "inside": "AddBackward0"}
    assert _grad_fn_name(layer, x) == "FusedLoraLinearBackward"
    assert not hasattr(fast, "disabled") and not hasattr(fast, "is_enabled")


def test_conv1d_layout_and_embedding_untouched():
    model = tiny_models.gpt2()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "wte"], init_lora_weights=False
    )
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    ids = tiny_models.input_ids(batch=2, length=8)
    model.train()
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    with fast.plain_path():
        loss_plain = model(ids, labels=ids).loss
        plain = torch.autograd.grad(loss_plain, [p for p in model.parameters() if p.requires_grad])
    assert abs(loss.item() - loss_plain.item()) <= 1e-6 * abs(loss_plain.item())
    for g, w in zip(grads, plain, strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max()
    with torch.no_grad():  # embedding: plain branch added in place; Conv1D: fused inference
        logits = model.eval()(ids).logits
        with fast.plain_path():
            plain_logits = model(ids).logits
        with lorakit.disabled(model):
            base_logits = model(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapters change the output
    assert (logits - plain_logits).abs().max() <= 1e-5 * plain_logits.abs().max()
    layers = dict(lora_layers(model))
    attn = layers["transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 8, 64, requires_grad=True)
    assert _grad_fn_name(attn, x) == "FusedLoraLinearBackward"


@pytest.mark.parametrize("dropout", [0.05, 0.2])  # positions; lanes
def test_gradient_checkpointing_recomputes_the_same_dropout_mask(dropout):
    """Checkpointing re-runs forwards under the saved RNG state, so the regenerated seeds (and
    masks) match: gradients equal those of the same step without checkpointing."""
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout
    )
    grads = []
    for checkpointing in (False, True):
        model = lorakit.inject(tiny_models.llama(), config)
        tiny_models.randomize_adapters(model, std=0.3)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(4)
        ids = tiny_models.input_ids(batch=2, length=10)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 24), (7, 5), (1,), (3, 0)])
def test_packed_mask_round_trips(shape):
    """Bits in, the same mask out, for sizes that are and are not multiples of 8."""
    from lorakit.fast.dropout import pack_mask, unpack_mask

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    if mask.numel() >= 8:  # element 8i + j is bit j of byte i
        first = sum(int(mask.reshape(-1)[j]) << j for j in range(8))
        assert int(packed[0]) == first


@pytest.mark.parametrize("levels", [0, SPARSE_LEVELS + 1, 32768, 65535, DROPOUT_LEVELS])
@pytest.mark.parametrize("shape", [(37, 11), (4,)])
def test_keep_mask_is_the_lane_comparison(levels, shape):
    """Above p = 1/8: the mask keeps an element exactly when its 16-bit lane (the seed's 64-bit
    words, four lanes each) is at least ``levels - 32768``, whatever arithmetic computes it."""
    numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=torch.Generator().manual_seed(99))
    want = (words.view(torch.int16)[:numel].int() >= levels - 32768).view(shape)
    got = keep_mask(shape, levels, 99, torch.device("cpu"))
    assert got.dtype == torch.bool and torch.equal(got, want)
    if levels in (SPARSE_LEVELS + 1, 32768) and numel > 100:  # some dropped, some kept
        assert not got.all() and got.any()


@pytest.mark.parametrize("levels", [1, 3277, SPARSE_LEVELS])
@pytest.mark.parametrize("shape", [(37, 11), (4,), (0, 5)])
def test_keep_mask_drops_at_geometric_gaps(levels, shape):
    """Up to p = 1/8 (CPU) the mask drops the elements at the cumulated geometric gaps
    ``floor(log(1 - U) / log(1 - p))`` of the seed's float32 uniforms (the gaps computed here
    with the same float32 operations, their positions one by one in Python)."""
    numel = math.prod(shape)
    p = levels / DROPOUT_LEVELS
    batch = int(numel * p + 8 * math.sqrt(numel * p) + 16)
    uniforms = torch.rand(batch, generator=torch.Generator().manual_seed(99))
    gaps = (torch.log1p(-uniforms) * (1.0 / math.log1p(-p))).floor().tolist()
    dropped, position = [], -1
    for gap in gaps:
        position += int(gap) + 1
        if position >= numel:
            break
        dropped.append(position)
    assert position >= numel  # one batch was enough
    want = torch.ones(numel, dtype=torch.bool)
    want[dropped] = False
    got = keep_mask(shape, levels, 99, torch.device("cpu"))
    assert got.dtype == torch.bool and torch.equal(got, want.view(shape))
    positions = dropped_positions(numel, levels, 99, torch.device("cpu"))
    assert positions.tolist() == dropped


@pytest.mark.parametrize("dropout", [0.05, 0.1])
def test_position_masks_drop_independently_everywhere(dropout):
    """Masks drawn as positions: the rate is p in each part of the tensor, and neighbours
    (next element, next row) are dropped together with probability p^2."""
    mask = keep_mask((1000, 1000), drop_levels(dropout), seed=3, device=torch.device("cpu"))
    dropped = (~mask).double()
    sigma = (dropout * (1 - dropout) / 250_000) ** 0.5
    for part in (
        dropped[:500, :500],
        dropped[:500, 500:],
        dropped[500:, :500],
        dropped[500:, 500:],
    ):
        assert abs(part.mean().item() - dropout) < 5 * sigma
    pairs = {
        "next element": dropped[:, 1:] * dropped[:, :-1],
        "next row": dropped[1:] * dropped[:-1],
    }
    for name, both in pairs.items():
        assert abs(both.mean().item() - dropout**2) < 5 * (dropout**2 / 999_000) ** 0.5, name


@pytest.mark.parametrize("dropout", [0.3, 0.1])
def test_masked_gradients_equal_the_formula_in_row_chunks(dropout, monkeypatch):
    """fp32 adapters on a bf16 base take A's gradient from row chunks of x: each chunk is
    masked with its own rows of the mask (both mask forms), as one whole-x product would be."""
    import lorakit.fast.linear as fast_linear

    layer = _layer(torch.bfloat16, dropout=dropout, in_f=64, out_f=48)
    x = torch.randn(6, 10, 64, dtype=torch.bfloat16)
    grads = []
    for chunk in (fast_linear.CHUNK_ELEMENTS, 64 * 7):  # one chunk; 7 rows a chunk
        monkeypatch.setattr(fast_linear, "CHUNK_ELEMENTS", chunk)
        torch.manual_seed(2)
        layer(x).float().square().sum().backward()
        grads.append(layer.lora_A["default"].weight.grad.clone())
        layer.zero_grad()
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()  # fp32 sum order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.05, 0.3])
def test_dropout_on_a_non_contiguous_input_equals_its_contiguous_copy(dtype, dropout):
    """A transposed input (rows not contiguous) gets the same mask, output and gradients as
    its contiguous copy (the masked copies of x are made contiguous, in both mask forms and in
    the row chunks of fp32 adapters on a bf16 base)."""
    layer = _layer(dtype, dropout=dropout, in_f=64, out_f=48)
    x_t = torch.randn(64, 40, dtype=dtype).T.requires_grad_()  # (40, 64), strides (1, 40)
    x_c = x_t.detach().contiguous().requires_grad_()
    results = []
    for x in (x_t, x_c):
        torch.manual_seed(8)
        out = layer(x)
        out.float().square().sum().backward()
        results.append((out.detach(), x.grad, layer.lora_A["default"].weight.grad.clone()))
        layer.zero_grad()
    for got, want in zip(*results, strict=True):  # products on either layout: sum order
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _two_adapter_layer(first: dict, second: dict | None) -> nn.Module:
    """An nn.Linear(12, 10) with adapters "a" (``first``) and "b" (``second``; None: "a"
    alone), all active, random non-zero factors (and magnitudes, biases on B)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    adapters = {"a": first} if second is None else {"a": first, "b": second}
    for name, changes in adapters.items():
        config = lorakit.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False, **changes)
        lorakit.inject(model, config, adapter_name=name)
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name and parameter_name.endswith(".bias"):
                parameter.normal_()
    lorakit.set_active(model, list(adapters))
    return model[0]


def test_a_lora_adapters_dropout_is_kept_beside_a_dora_adapter_without_autograd():
    """Train mode under no_grad (e.g. an evaluation that forgot .eval()): the LoRA adapter's
    dropout draws its mask as on the plain path; the DoRA inference formula has no masks."""
    layer = _two_adapter_layer({"use_dora": True}, {"lora_dropout": 0.5}).train()
    x = torch.randn(64, 12)
    with torch.no_grad():
        torch.manual_seed(1)
        default = layer(x)
        with fast.plain_path():
            torch.manual_seed(1)
            plain = layer(x)
        layer.eval()
        undropped = layer(x)
    torch.testing.assert_close(default, plain, rtol=0, atol=1e-6)
    assert (default - undropped).abs().max() > 1e-2  # a mask was drawn


def test_two_adapters_whose_biases_on_b_train_both_reach_the_output():
    """A and B frozen, only the biases on B trainable: the call records a gradient, so the
    one-adapter training node must not take it (it added adapter "a" alone)."""
    layer = _two_adapter_layer({"lora_bias": True}, {"lora_bias": True}).train()
    for name in ("a", "b"):
        layer.lora_A[name].weight.requires_grad_(False)
        layer.lora_B[name].weight.requires_grad_(False)
    x = torch.randn(4, 12)
    with fast.plain_path():
        plain = layer(x)
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=1e-6)
    with torch.no_grad():
        only_a = layer.base_layer(x) + layer.lora_branch("a", x)
    assert (plain - only_a).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"use_dora": True, "lora_dropout": 0.3}, None),
        ({"lora_dropout": 0.3}, {"lora_dropout": 0.3}),
    ],
)
def test_a_reentrant_checkpoint_draws_the_masks_of_its_recompute(first, second):
    """``checkpoint(use_reentrant=True)`` runs the forward without autograd, then recomputes it
    with autograd under the same RNG state: both must take the same path and draw the same
    masks, so output and gradients equal those of the step without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    layer = _two_adapter_layer(first, second)
    layer.train()
    x = torch.randn(6, 12, requires_grad=True)
    parameters = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for checkpointed in (False, True):
        for tensor in (*parameters, x):
            tensor.grad = None
        torch.manual_seed(7)
        out = checkpoint(layer, x, use_reentrant=True) if checkpointed else layer(x)
        (out**2).sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in parameters)])
    for plain, checkpointed in zip(*results, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)


def _second_order(layer, x):
    """``d(sum dL/dB)/dA`` and ``/dx`` for ``L = sum(layer(x)^2)``: through ``dL/dB = s G^T u``,
    the terms a first-order-only backward would drop."""
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    (grad_B,) = torch.autograd.grad(layer(x).pow(2).sum(), [lora_B], create_graph=True)
    return torch.autograd.grad(grad_B.sum(), [lora_A, x])


def test_double_backward_through_the_fused_node_is_refused_and_plain_path_gives_it():
    layer = _layer(torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"first-order gradients only.*plain_path"):
        _second_order(layer, x)
    with fast.plain_path():
        got = _second_order(layer, x)
    base, lora_A, lora_B = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
    weight, bias = base.weight.detach(), base.bias.detach()
    A, B = lora_A.weight.detach().requires_grad_(), lora_B.weight.detach().requires_grad_()
    x_ref = x.detach().requires_grad_()
    out = _reference(x_ref, weight, bias, A, B, layer.scalings["default"])
    (grad_B,) = torch.autograd.grad(out.pow(2).sum(), [B], create_graph=True)
    expected = torch.autograd.grad(grad_B.sum(), [A, x_ref])
    for value, reference in zip(got, expected, strict=True):
        assert reference.abs().max() > 0
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10)


def test_forward_mode_ad_takes_the_plain_formula():
    import torch.autograd.forward_ad as forward_ad

    layer = _layer(torch.float64)
    x, tangent = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 3, 12).double()
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent)))
    base, lora_A, lora_B = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
    weight, scale = base.weight.detach().double(), layer.scalings["default"]
    # the layer is linear in x: its directional derivative is the layer without the bias
    expected = _reference(tangent, weight, None, lora_A.weight, lora_B.weight, scale)
    torch.testing.assert_close(out.tangent, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        out.primal, _reference(x, weight, base.bias.detach(), lora_A.weight, lora_B.weight, scale)
    )
