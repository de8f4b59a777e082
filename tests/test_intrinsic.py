"""The Fastfood projection and the random-subspace (intrinsic dimension / SAID) wrapper."""

from __future__ import annotations

import pytest
import torch

from lorakit.analysis.intrinsic import (
    Fastfood,
    IntrinsicDimension,
    bootstrap_d90,
    d90,
    d90_of_gain,
    hadamard_transform,
)
from tests import tiny_models


def sylvester(length: int) -> torch.Tensor:
    """The ±1 Hadamard matrix by Sylvester's construction, float64 (the reference)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < length:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("length", [8, 64, 1024])
def test_hadamard_transform_matches_the_matrix(length):
    x = torch.randn(3, length, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ sylvester(length))
    small = x[:, :8].clone().requires_grad_(True)  # backward = H applied to the gradient
    assert torch.autograd.gradcheck(hadamard_transform, (small,))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.zeros(6))


def test_hadamard_transform_recursion_over_three_factors():
    x = torch.randn(2, 2 * 4096, dtype=torch.float64)  # 2^13: factors 64 x 64 x 2
    first, second = hadamard_transform(x[:, :4096]), hadamard_transform(x[:, 4096:])
    expected = torch.cat([first + second, first - second], dim=1)  # H_2L = [[H, H], [H, -H]]
    torch.testing.assert_close(hadamard_transform(x), expected)


def dense_fastfood(projection: Fastfood) -> torch.Tensor:
    """P as an explicit (D, d) float64 matrix, assembled from the module's random diagonals."""
    length = projection.block
    h = sylvester(length)
    blocks = []
    for b in range(projection.signs.shape[0]):
        permutation = torch.eye(length, dtype=torch.float64)[projection.permutation[b]]
        block = (
            h
            @ torch.diag(projection.gaussian[b].double())
            @ permutation
            @ h
            @ torch.diag(projection.signs[b].double())
        ) / projection.normaliser[b].double()
        blocks.append(block[:, : projection.dimension])
    return torch.cat(blocks)[: projection.total]


@pytest.mark.parametrize(("d", "total"), [(5, 20), (8, 64), (1, 3), (13, 100), (20, 7)])
def test_fastfood_equals_its_dense_matrix(d, total):
    projection = Fastfood(d, total, seed=3)
    theta = torch.randn(d, dtype=torch.float64)
    dense = dense_fastfood(projection)
    assert dense.shape == (total, d)
    torch.testing.assert_close(projection(theta), dense @ theta)


def test_fastfood_is_a_fixed_linear_map_with_unit_columns():
    projection = Fastfood(10, 16 * 32, seed=1)  # L = 16, 32 full blocks
    a, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(projection(a + b), projection(a) + projection(b))
    torch.testing.assert_close(projection(2.5 * a), 2.5 * projection(a))
    torch.testing.assert_close(projection(a), projection(a))  # fixed: same map each call
    for j in range(10):
        column = projection(torch.eye(10, dtype=torch.float64)[j])
        assert float(column.norm()) == pytest.approx(1.0, abs=1e-12)
    same_seed = Fastfood(10, 16 * 32, seed=1)
    torch.testing.assert_close(same_seed(a), projection(a))
    assert not torch.allclose(Fastfood(10, 16 * 32, seed=2)(a), projection(a))


def test_fastfood_memory_is_linear_in_D():
    d, total = 3000, 500_000
    projection = Fastfood(d, total, seed=0)
    stored = sum(buffer.numel() for buffer in projection.buffers())
    padded = projection.block * projection.signs.shape[0]
    assert padded < total + projection.block
    assert stored <= 3 * padded + projection.signs.shape[0]  # B, Π, G and one norm per block
    theta = torch.randn(d, requires_grad=True)
    out = projection(theta)
    assert out.shape == (total,)
    (out**2).sum().backward()
    assert theta.grad.shape == (d,)  # (P^T P θ) without any D x d matrix


def test_intrinsic_wrapper_starts_at_the_model_and_trains_in_the_subspace():
    model = tiny_models.bert()
    ids = tiny_models.input_ids(batch=4, length=8)
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        expected = model(ids).logits
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapper = IntrinsicDimension(model, 64, said=True, seed=0)
    trainable = [name for name, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable == ["theta_d", "scales"]
    assert wrapper.trainable_dimension == 64 + len(reference)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids).logits, expected)
    optimizer = torch.optim.Adam([wrapper.theta_d, wrapper.scales], lr=1.0)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(wrapper(ids).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    for name, parameter in model.named_parameters():  # θ_0 is never modified
        assert torch.equal(parameter, reference[name])
    params = wrapper.reparametrised()
    flat = wrapper.projection(wrapper.theta_d.detach())
    chunks = torch.split(flat, wrapper.sizes)
    for index, name in enumerate(wrapper.names[:3]):
        step = wrapper.scales[index].detach() * chunks[index].view(reference[name].shape)
        torch.testing.assert_close(params[name].detach(), reference[name] + step)


def test_intrinsic_wrapper_subset_and_plain_mode():
    model = tiny_models.bert()
    names = [n for n, _ in model.named_parameters() if ".attention." in n]
    wrapper = IntrinsicDimension(model, 16, names, said=False)
    assert wrapper.scales is None and wrapper.trainable_dimension == 16
    assert model.classifier.weight.requires_grad  # not chosen: left as it was
    assert wrapper.projection.total == sum(
        p.numel() for n, p in model.named_parameters() if n in names
    )
    with pytest.raises(ValueError, match="unknown parameter"):
        IntrinsicDimension(model, 4, ["nope"])


def test_d90_is_the_smallest_dimension_reaching_the_threshold():
    scores = {10: 0.55, 100: 0.71, 1000: 0.80, 10000: 0.84}
    assert d90(scores, full_score=0.88) == 1000  # 0.9 * 0.88 = 0.792
    assert d90(scores, full_score=0.99) is None
    assert d90({5: 0.9, 50: 0.7}, full_score=1.0) == 5


def float64_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


@pytest.mark.parametrize("said", [True, False])
def test_theta_d_zero_gives_theta_0_exactly(said):
    model = float64_mlp()
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapper = IntrinsicDimension(model, 5, said=said, seed=2)
    if said:
        with torch.no_grad():
            wrapper.scales.copy_(torch.tensor([0.3, -2.0, 7.0, 0.5], dtype=wrapper.scales.dtype))
    for name, value in wrapper.reparametrised().items():
        assert torch.equal(value, reference[name]), name  # bit for bit, not approximately
    x = torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(wrapper(x), torch.func.functional_call(model, reference, (x,)))


def test_said_equals_the_dense_formula_and_gradients_reach_only_theta_d_and_scales():
    model = float64_mlp()
    theta_0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapper = IntrinsicDimension(model, 5, said=True, seed=4)
    wrapper.double()
    theta_d = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75], dtype=torch.float64)
    scales = torch.tensor([1.5, -0.5, 2.0, 0.25], dtype=torch.float64)
    with torch.no_grad():
        wrapper.theta_d.copy_(theta_d)
        wrapper.scales.copy_(scales)
    dense = dense_fastfood(wrapper.projection)  # (D, d) = (26, 5)
    pieces = torch.split(dense @ theta_d, wrapper.sizes)
    expected = {
        name: theta_0[name] + scales[i] * pieces[i].view(theta_0[name].shape)
        for i, name in enumerate(wrapper.names)
    }
    params = wrapper.reparametrised()
    for name in wrapper.names:
        torch.testing.assert_close(params[name], expected[name], rtol=0, atol=1e-12)
    # a linear loss sum_i <W_i, θ^(i)>: dL/dλ_i = <W_i, (Pθ_d)^(i)>, dL/dθ_d = P^T (λ_i W_i)_i
    weights = {name: torch.randn(theta_0[name].shape, dtype=torch.float64) for name in params}
    loss = sum((weights[name] * params[name]).sum() for name in params)
    loss.backward()
    flat_w = torch.cat([scales[i] * weights[n].reshape(-1) for i, n in enumerate(wrapper.names)])
    torch.testing.assert_close(wrapper.theta_d.grad, dense.T @ flat_w, rtol=0, atol=1e-12)
    expected_scale_grad = torch.stack(
        [(weights[n].reshape(-1) * pieces[i]).sum() for i, n in enumerate(wrapper.names)]
    )
    torch.testing.assert_close(wrapper.scales.grad, expected_scale_grad, rtol=0, atol=1e-12)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None and not parameter.requires_grad, name
        assert torch.equal(parameter, theta_0[name])


def test_d90_of_gain_is_relative_to_the_frozen_baseline():
    scores = {10: 0.74, 100: 0.77, 1000: 0.79}
    # frozen 0.72, full 0.80: the gain 0.08 needs >= 0.072, i.e. a score >= 0.792 -> none
    assert d90_of_gain(scores, full_score=0.80, frozen_score=0.72) is None
    assert d90_of_gain(scores, full_score=0.80, frozen_score=0.60) == 1000  # needs >= 0.78
    assert d90(scores, full_score=0.80) == 10  # the paper's: >= 0.72
    assert d90_of_gain(scores, full_score=0.70, frozen_score=0.72) is None  # no gain to share


def test_bootstrap_d90_interval_from_seeds():
    same = bootstrap_d90({100: [0.8, 0.8], 1000: [0.87, 0.87]}, [0.88, 0.88], [0.7, 0.7])
    assert same["of_full"] == {"point": 100, "low": 100, "high": 100, "undefined": 0.0}
    assert same["of_gain"] == {"point": 1000, "low": 1000, "high": 1000, "undefined": 0.0}
    # of gain: 0.9 * (0.88 - 0.70) needs a score >= 0.862, d = 1000 has 0.87
    # d = 100 reaches 0.792 only when both resampled seeds are the 0.80 one (1 in 4 resamples)
    mixed = bootstrap_d90(
        {100: [0.70, 0.80], 1000: [0.85, 0.85]}, [0.88, 0.88], [0.70, 0.70], resamples=4000
    )
    assert mixed["of_full"]["point"] == 1000
    assert (mixed["of_full"]["low"], mixed["of_full"]["high"]) == (100, 1000)
    assert mixed["of_full"]["undefined"] == 0.0
    assert mixed["of_gain"] == {"point": None, "low": None, "high": None, "undefined": 1.0}
    with pytest.raises(ValueError, match="at least one score"):
        bootstrap_d90({100: []}, [0.9], [0.7])


def test_a_score_exactly_at_the_threshold_reaches_it():
    """Accuracies are multiples of 1/n: 0.72 is 90% of 0.80 (in floats 0.9 * 0.80 is
    0.7200000000000001), and a gain of 0.27 is 90% of 0.30."""
    from lorakit.analysis.intrinsic import bootstrap_d90, d90, d90_of_gain

    assert d90({1000: 0.72, 3000: 0.75}, full_score=0.80) == 1000
    assert d90_of_gain({1000: 0.77, 3000: 0.79}, full_score=0.80, frozen_score=0.50) == 1000
    assert d90({1000: 0.7199}, full_score=0.80) is None
    found = bootstrap_d90({1000: [0.77, 0.77]}, full=[0.80], frozen=[0.50], resamples=10)
    assert found["of_gain"]["point"] == 1000 and found["of_gain"]["undefined"] == 0
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_d90({1000: [0.77]}, full=[0.80], frozen=[0.50], resamples=0)


def test_fastfood_of_a_half_precision_theta_runs_in_float32():
    """In float16 the transform's intermediate values (about L |θ_d|) overflowed: NaN and
    zeros came out. θ_d is rounded to float16 once; the transform itself runs in float32."""
    projection = Fastfood(32768, 1_000_000, seed=0)
    theta = torch.randn(32768, generator=torch.Generator().manual_seed(1)).half()
    exact = projection(theta.double())
    got = projection(theta)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got.double() - exact).norm() / exact.norm()) < 1e-5
    with pytest.raises(TypeError, match=r"tables were cast to torch\.float16"):
        Fastfood(8, 64).half()(torch.ones(8))


def test_fastfood_runs_on_the_device_of_theta():
    projection = Fastfood(10, 200).to("meta")
    assert projection(torch.ones(10, device="meta")).device.type == "meta"


def test_half_precision_parameters_are_refused_by_name():
    """SAID's steps are below bfloat16's resolution of θ_0: most would be rounded away."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"parameter '0\.weight' is torch\.bfloat16"):
        IntrinsicDimension(model, 4)
