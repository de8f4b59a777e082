"""Review 36, items 8 and 9: argument checks of the intrinsic-dimension API.

8. ``d90`` / ``d90_of_gain`` / ``bootstrap_d90`` with the str keys a results JSON gives back read
   them as the ints d (they took the alphabetical minimum, then raised TypeError); a threshold
   outside (0, 1], a non-finite baseline score and a non-integer ``resamples`` are refused with
   the argument named.
9. ``IntrinsicDimension(parameter_names="0.weight")`` is refused with a message asking for a
   list (it reported the characters as unknown names); a non-int ``seed`` is refused by name
   (a raw torch error before).

Oracle: the d90 definition written out here in plain float64 Python over the int dimensions,
and torch's own generator for the seeds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lorakit.analysis.intrinsic import (
    Fastfood,
    IntrinsicDimension,
    bootstrap_d90,
    d90,
    d90_of_gain,
)

# dimensions whose alphabetical order ('1000' < '30' < '300' < '3000') is not their order
SCORES = {30: 0.61, 300: 0.74, 1000: 0.755, 3000: 0.77, 10000: 0.80}
FULL, FROZEN = 0.80, 0.60
THRESHOLD_MESSAGE = r"threshold must be a fraction in \(0, 1\] \(0\.9 for 90%\), got "


def from_json(mapping: dict) -> dict:
    """The mapping as ``json.load`` gives it back: every key a str."""
    return json.loads(json.dumps(mapping))


def oracle_d90(scores: dict[int, float], full: float, threshold: float = 0.9) -> int | None:
    """The smallest int d with score >= threshold * full (no score here is near a tie)."""
    reached = [int(d) for d, score in scores.items() if score >= threshold * full]
    return min(reached) if reached else None


def oracle_d90_of_gain(scores, full, frozen, threshold=0.9):
    gains = {d: score - frozen for d, score in scores.items()}
    return oracle_d90(gains, full - frozen, threshold)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


def all_trainable(net: nn.Module) -> bool:
    return all(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------ 8. d90's arguments


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.5, 1.0])
def test_d90_reads_json_string_keys_as_the_int_dimensions(threshold):
    read_back = from_json(SCORES)
    assert list(read_back) == ["30", "300", "1000", "3000", "10000"]
    expected = oracle_d90(SCORES, FULL, threshold)
    found = d90(read_back, FULL, threshold)
    assert found == expected and type(found) is int
    assert d90(SCORES, FULL, threshold) == expected
    gain = oracle_d90_of_gain(SCORES, FULL, FROZEN, threshold)
    assert d90_of_gain(read_back, FULL, FROZEN, threshold) == gain


def test_d90_picks_the_numeric_minimum_not_the_alphabetical_one():
    # the review's case: '1000' < '300' alphabetically, 300 < 1000 as dimensions
    read_back = from_json({300: 0.75, 1000: 0.76, 3000: 0.77})
    assert d90(read_back, 0.80) == 300 == oracle_d90({300: 0.75, 1000: 0.76, 3000: 0.77}, 0.80)
    assert d90({"300": 0.70, 1000: 0.73, np.int64(3000): 0.77}, 0.80) == 1000


def test_bootstrap_d90_reads_json_string_keys():
    # identical seeds: every resample has the same means, so low = point = high = the oracle
    runs = {d: [score, score, score] for d, score in SCORES.items()}
    full, frozen = [FULL] * 3, [FROZEN] * 3
    found = bootstrap_d90(from_json(runs), full, frozen, resamples=50)
    of_full, of_gain = oracle_d90(SCORES, FULL), oracle_d90_of_gain(SCORES, FULL, FROZEN)
    assert of_full == 300 and of_gain == 10000
    assert found["of_full"] == {"point": of_full, "low": of_full, "high": of_full, "undefined": 0}
    assert found["of_gain"] == {"point": of_gain, "low": of_gain, "high": of_gain, "undefined": 0}
    noisy = {d: [score - 0.02, score + 0.02] for d, score in SCORES.items()}
    same = bootstrap_d90(noisy, [0.79, 0.81], [0.6, 0.61], resamples=200, seed=4)
    assert bootstrap_d90(from_json(noisy), [0.79, 0.81], [0.6, 0.61], resamples=200, seed=4) == same


def test_keys_that_are_not_dimensions_are_refused():
    with pytest.raises(ValueError, match=r"d=300 appears twice in the keys of scores"):
        d90({"300": 0.75, 300: 0.70}, 0.80)
    for bad in ("1e3", "three hundred", 1000.5, math.nan, True):  # 1000.0 is d = 1000 (review 37)
        with pytest.raises(TypeError, match=r"keys of scores must be the dimensions d as ints"):
            d90({bad: 0.75}, 0.80)
    with pytest.raises(TypeError, match=r"keys of runs must be the dimensions d as ints"):
        bootstrap_d90({"d300": [0.75]}, [0.8], [0.6], resamples=5)


@pytest.mark.parametrize("threshold", [90, 0, 0.0, -1, 1.5, 1.0000001, math.nan, math.inf])
def test_a_threshold_outside_zero_one_is_refused_by_every_d90(threshold):
    with pytest.raises(ValueError, match=THRESHOLD_MESSAGE):
        d90(SCORES, FULL, threshold)
    with pytest.raises(ValueError, match=THRESHOLD_MESSAGE):
        d90_of_gain(SCORES, FULL, FROZEN, threshold)
    with pytest.raises(ValueError, match=THRESHOLD_MESSAGE):  # even with no gain to share
        d90_of_gain(SCORES, FROZEN, FULL, threshold)
    with pytest.raises(ValueError, match=THRESHOLD_MESSAGE):
        bootstrap_d90({100: [0.7, 0.71]}, [0.8], [0.6], threshold=threshold, resamples=10)


@pytest.mark.parametrize("threshold", ["0.9", None, True])
def test_a_threshold_that_is_not_a_number_is_refused(threshold):
    with pytest.raises(TypeError, match=r"threshold must be a fraction in \(0, 1\], got "):
        d90(SCORES, FULL, threshold)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan")])
def test_a_non_finite_baseline_score_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"^full_score must be a finite number, got "):
        d90(SCORES, bad)
    with pytest.raises(ValueError, match=r"^full_score must be a finite number, got "):
        d90_of_gain(SCORES, bad, FROZEN)
    with pytest.raises(ValueError, match=r"^frozen_score must be a finite number, got "):
        d90_of_gain(SCORES, FULL, bad)
    with pytest.raises(ValueError, match=r"^full\[1\] must be a finite number, got "):
        bootstrap_d90({100: [0.7, 0.71]}, [0.8, bad], [0.6], resamples=10)
    with pytest.raises(ValueError, match=r"^frozen\[0\] must be a finite number, got "):
        bootstrap_d90({100: [0.7, 0.71]}, [0.8], [bad], resamples=10)


def test_finite_baselines_of_other_numeric_types_still_work():
    expected = oracle_d90(SCORES, FULL)
    assert d90(SCORES, np.float32(FULL)) == expected == d90(SCORES, torch.tensor(FULL))
    with pytest.raises(TypeError, match=r"^full must be a list of scores, one per seed"):
        bootstrap_d90({100: [0.7, 0.71]}, 0.8, [0.6], resamples=10)


def test_bootstrap_resamples_and_seed_must_be_ints():
    args = ({100: [0.7, 0.71]}, [0.8], [0.6])
    with pytest.raises(TypeError, match=r"^resamples must be an integer >= 1, got 1\.5$"):
        bootstrap_d90(*args, resamples=1.5)
    with pytest.raises(ValueError, match=r"resamples must be >= 1, got 0"):
        bootstrap_d90(*args, resamples=0)
    # None (fresh randomness, as random.Random(None)) is accepted again (review 37)
    with pytest.raises(TypeError, match=r"^seed must be an int .* got "):
        bootstrap_d90(*args, resamples=10, seed=1.5)
    assert bootstrap_d90(*args, resamples=10, seed=np.int64(3)) == bootstrap_d90(
        *args, resamples=10, seed=3
    )


# ------------------------------------------------------------------ 9. the wrapper's arguments


def test_parameter_names_as_a_bare_string_is_refused_with_the_fix():
    net = small_net()
    with pytest.raises(
        TypeError,
        match=r"^parameter_names must be a list of parameter names, got the string '0\.weight'; "
        r"pass \['0\.weight'\]",
    ):
        IntrinsicDimension(net, 4, "0.weight")
    assert all_trainable(net)  # left as it was
    wrapper = IntrinsicDimension(net, 4, ["0.weight"], said=False, seed=1)
    assert wrapper.names == ["0.weight"] and wrapper.projection.total == 64


def test_parameter_names_from_a_generator_give_the_same_wrapper_as_a_list():
    listed = IntrinsicDimension(small_net(), 6, ["0.weight", "1.bias"], seed=2)
    generated = IntrinsicDimension(small_net(), 6, (n for n in ["0.weight", "1.bias"]), seed=2)
    assert generated.names == listed.names and generated.sizes == [64, 2]
    theta = torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        listed.theta_d.copy_(theta)
        generated.theta_d.copy_(theta)
    got, want = generated.reparametrised(), listed.reparametrised()
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("seed", [None, 1.5, "0", True])
def test_a_seed_that_is_not_an_int_is_refused_by_name(seed):
    net = small_net()
    with pytest.raises(TypeError, match=r"^seed must be an int .* got "):
        IntrinsicDimension(net, 4, seed=seed)
    assert all_trainable(net)
    with pytest.raises(TypeError, match=r"^seed must be an int .* got "):
        Fastfood(4, 90, seed=seed)


def test_a_seed_out_of_torch_range_is_refused_and_int_seeds_match_torch():
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\), got "):
        Fastfood(4, 90, seed=2**64)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\), got "):
        IntrinsicDimension(small_net(), 4, seed=-(2**63) - 1)
    for seed in (-1, 0, 7, np.int64(7), 2**64 - 1):
        projection = Fastfood(10, 40, seed=seed)  # L = 16, 3 blocks
        generator = torch.Generator().manual_seed(int(seed))  # the draws, in Fastfood's order
        signs = torch.randint(0, 2, (3, 16), generator=generator) * 2 - 1
        assert torch.equal(projection.signs, signs.to(torch.int8))
        perm = torch.argsort(torch.rand(3, 16, generator=generator), dim=1)
        assert torch.equal(projection.permutation, perm)
