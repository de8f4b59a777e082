"""The Fastfood projection and the random-subspace (intrinsic dimension / SAID) wrapper."""

from __future__ import annotations

import pytest
import torch

from lorakit.analysis.intrinsic import Fastfood, IntrinsicDimension, d90, hadamard_transform
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


@pytest.mark.parametrize(("d", "total"), [(5, 20), (8, 64), (1, 3), (13, 100)])
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
