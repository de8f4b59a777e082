"""``lorakit.combining.methods`` against real PEFT's ``peft.utils.merge_utils`` on the same task
tensors: equal for the deterministic methods; for DARE equal masks given the documented seed
handling, and the expected value of the rescaled drop is the plain weighted sum."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft.utils import merge_utils

from lorakit.combining import methods

WEIGHTS = [0.7, -0.4, 1.2]


def _updates(dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(12, 20, generator=generator, dtype=dtype) for _ in range(3)]


def _peft_weights(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(WEIGHTS, dtype=dtype)


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
def test_magnitude_prune_equals_peft(density):
    updates = _updates()
    expected = merge_utils.magnitude_prune(updates, _peft_weights(), density)
    assert torch.equal(methods.magnitude_prune(updates, WEIGHTS, density), expected)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_peft(density, sign_method):
    updates = _updates(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        expected = merge_utils.ties(updates, _peft_weights(torch.float64), density, sign_method)
    result = methods.ties(updates, WEIGHTS, density, sign_method)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(result, methods.weighted_sum(updates, WEIGHTS))


def test_weighted_sum_equals_peft_task_arithmetic():
    updates = _updates()
    expected = merge_utils.task_arithmetic(updates, _peft_weights())
    torch.testing.assert_close(methods.weighted_sum(updates, WEIGHTS), expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_uses_the_same_masks_as_peft_after_manual_seed(name):
    """PEFT draws from the global generator; ours from a generator with the same seed, float32
    probabilities, one draw per update in order: the same masks, so equal results (and float64
    updates use the same masks too)."""
    updates = _updates()
    torch.manual_seed(123)
    expected = getattr(merge_utils, name)(updates, _peft_weights(), 0.4)
    ours = getattr(methods, name)(
        updates, WEIGHTS, 0.4, generator=torch.Generator().manual_seed(123)
    )
    torch.testing.assert_close(ours, expected)
    in_float64 = getattr(methods, name)(
        [u.double() for u in updates], WEIGHTS, 0.4, generator=torch.Generator().manual_seed(123)
    )
    torch.testing.assert_close(in_float64.float(), expected)


def test_dare_keeps_the_expected_update_and_the_density():
    updates = _updates(torch.float64)
    exact = methods.weighted_sum(updates, WEIGHTS)
    draws = [
        methods.dare_linear(updates, WEIGHTS, 0.5, generator=torch.Generator().manual_seed(s))
        for s in range(400)
    ]
    mean = torch.stack(draws).mean(dim=0)
    # each entry: mean of 400 draws with std <= sqrt(Σ w² x²) / sqrt(400); 6 sigma bound
    spread = torch.sqrt(sum((w * u) ** 2 for w, u in zip(WEIGHTS, updates, strict=True)))
    assert bool(((mean - exact).abs() <= 6 * spread / 20 + 1e-12).all())
    mask = methods.random_keep_mask(updates[0], 0.3, torch.Generator().manual_seed(1))
    assert float(mask.mean()) == pytest.approx(0.3, abs=0.1)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_dare_is_reproducible_from_the_generator_seed():
    updates = _updates()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return methods.dare_ties(updates, WEIGHTS, 0.3, generator=generator)

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_majority_sign_and_disjoint_mean_by_hand():
    first = torch.tensor([[2.0, -1.0, 0.0]])
    second = torch.tensor([[-1.0, -3.0, 0.0]])
    # signs elected from unweighted values: +, -, + (a zero total elects +)
    result = methods.ties([first, second], [1.0, 2.0], density=1.0)
    # entry 0: only the first agrees -> 1*2 / 1; entry 1: both -> (1*-1 + 2*-3) / 2; entry 2: 0
    assert torch.equal(result, torch.tensor([[2.0, -3.5, 0.0]]))
    frequency = methods.ties([first, second], [1.0, 2.0], 1.0, "frequency")
    # entry 0: one + and one - -> + elected; the rest as above
    assert torch.equal(frequency, torch.tensor([[2.0, -3.5, 0.0]]))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_densities_outside_zero_one_are_refused(density):
    with pytest.raises(ValueError, match="density must be in"):
        methods.ties(_updates(), WEIGHTS, density)


def test_weights_must_match_the_updates():
    with pytest.raises(ValueError, match="3 updates but 2 weights"):
        methods.weighted_sum(_updates(), [1.0, 2.0])
