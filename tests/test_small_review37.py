"""Review 37, two small defects.

1. ``d90`` / ``bootstrap_d90`` (session 36's checks, commit 2cbf718) refused what they had
   always read: float keys that are whole numbers (``{100.0: ...}``, ``np.float64`` keys),
   ``seed=None`` (fresh randomness, as ``random.Random(None)``) and a numpy array of scores.
   They are read again; what 2cbf718 meant to refuse still is.
2. ``lorakit plan --dtype float16`` counted T5's ``wo`` (kept in float32 by transformers:
   ``_keep_in_fp32_modules``) at 2 bytes.

Oracles: the d90 definition written out in float64 Python over int dimensions; the bytes of
the tiny T5 as ``transformers.from_pretrained(dtype=)`` loads it (the sum of its parameters'
``nbytes``), and as lorakit's int8-rows load leaves it (parameters and buffers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from lorakit.analysis.intrinsic import bootstrap_d90, d90, d90_of_gain
from lorakit.plan import plan
from lorakit.plan_report import format_report
from tests import tiny_models

SCORES = {30: 0.61, 300: 0.74, 1000: 0.755, 3000: 0.77, 10000: 0.80}
FULL, FROZEN = 0.80, 0.60


def oracle_d90(scores: dict, full: float, threshold: float = 0.9) -> int | None:
    """The smallest int d with score >= threshold * full (no score here is near a tie)."""
    reached = [int(d) for d, score in scores.items() if score >= threshold * full]
    return min(reached) if reached else None


def oracle_d90_of_gain(scores: dict, full: float, frozen: float) -> int | None:
    return oracle_d90({d: s - frozen for d, s in scores.items()}, full - frozen)


# ------------------------------------------------------------------ 1. d90's arguments


@pytest.mark.parametrize("as_key", [float, np.float64, np.float32, np.int64])
def test_whole_number_keys_of_any_type_are_the_dimensions(as_key):
    keyed = {as_key(d): score for d, score in SCORES.items()}
    found = d90(keyed, FULL)
    assert found == oracle_d90(SCORES, FULL) == 300 and type(found) is int
    assert d90_of_gain(keyed, FULL, FROZEN) == oracle_d90_of_gain(SCORES, FULL, FROZEN) == 10000
    assert d90({100.0: 0.75}, 0.8) == 100 and d90({np.float64(1000.0): 0.75}, 0.8) == 1000
    runs = {as_key(d): [score] * 3 for d, score in SCORES.items()}
    result = bootstrap_d90(runs, [FULL] * 3, [FROZEN] * 3, resamples=20)
    assert result["of_full"] == {"point": 300, "low": 300, "high": 300, "undefined": 0}
    assert result["of_gain"] == {"point": 10000, "low": 10000, "high": 10000, "undefined": 0}


def test_bootstrap_seed_none_draws_fresh_resamples():
    # identical seeds: every resample gives the oracle whatever the draws
    runs = {d: [score, score] for d, score in SCORES.items()}
    result = bootstrap_d90(runs, [FULL, FULL], [FROZEN, FROZEN], resamples=30, seed=None)
    assert result["of_full"] == {"point": 300, "low": 300, "high": 300, "undefined": 0}
    noisy = {d: [score - 0.03, score + 0.03] for d, score in SCORES.items()}
    drawn = bootstrap_d90(noisy, [0.78, 0.82], [0.59, 0.61], resamples=200, seed=None)
    means = {d: float(np.mean(v)) for d, v in noisy.items()}
    assert drawn["of_full"]["point"] == oracle_d90(means, 0.80)
    assert drawn["of_gain"]["point"] == oracle_d90_of_gain(means, 0.80, 0.60)
    low, high = drawn["of_full"]["low"], drawn["of_full"]["high"]
    assert low in SCORES and (high is None or low <= high)


def test_scores_as_numpy_arrays_give_the_lists_result():
    noisy = {d: [score - 0.02, score, score + 0.02] for d, score in SCORES.items()}
    full, frozen = [0.79, 0.80, 0.81], [0.59, 0.60, 0.61]
    listed = bootstrap_d90(noisy, full, frozen, resamples=100, seed=5)
    arrays = {d: np.array(v) for d, v in noisy.items()}
    got = bootstrap_d90(arrays, np.array(full), np.array(frozen), resamples=100, seed=5)
    assert got == listed
    assert got["of_full"]["point"] == oracle_d90(
        {d: float(np.mean(v)) for d, v in noisy.items()}, 0.8
    )
    one = bootstrap_d90({100: [0.9]}, full=np.array([0.95]), frozen=(0.5,), resamples=5)
    assert one["of_full"] == {"point": 100, "low": 100, "high": 100, "undefined": 0}
    tensors = bootstrap_d90({100: torch.tensor([0.9])}, torch.tensor([0.95]), [0.5], resamples=5)
    assert tensors == one


def test_what_session_36_meant_to_refuse_still_is():
    for bad in (1000.5, math.nan, math.inf, True, "1e3", "d300"):
        with pytest.raises(TypeError, match=r"keys of scores must be the dimensions d as ints"):
            d90({bad: 0.75}, 0.80)
    with pytest.raises(ValueError, match=r"d=100 appears twice in the keys of runs"):
        bootstrap_d90({100.0: [0.7], "100": [0.7]}, [0.8], [0.6], resamples=5)
    args = ({100: [0.7, 0.71]}, [0.8], [0.6])
    for seed in (1.5, "0", True):
        with pytest.raises(TypeError, match=r"^seed must be an int .* got "):
            bootstrap_d90(*args, resamples=5, seed=seed)
    for bad in (0.8, np.float64(0.8), np.array(0.8), np.array([[0.8]]), "0.8", {0: 0.8}, {0.8}):
        with pytest.raises(TypeError, match=r"^full must be a list of scores, one per seed"):
            bootstrap_d90({100: [0.7, 0.71]}, bad, [0.6], resamples=5)
    with pytest.raises(TypeError, match=r"^runs\[100\] must be a list of scores"):
        bootstrap_d90({100: {0.95, 0.5}}, [0.8], [0.6], resamples=5)  # (a set merges equal ones)
    with pytest.raises(ValueError, match=r"at least one score .*: full is empty"):
        bootstrap_d90({100: [0.7]}, np.array([]), [0.6], resamples=5)
    with pytest.raises(ValueError, match=r"at least one score .*: runs\[100\] is empty"):
        bootstrap_d90({100: np.array([])}, [0.8], [0.6], resamples=5)
    with pytest.raises(ValueError, match=r"^full\[1\] must be a finite number"):
        bootstrap_d90({100: [0.7]}, np.array([0.8, np.nan]), [0.6], resamples=5)


# ------------------------------------------------------------------ 2. plan's float32 modules


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5")
    tiny_models.t5().save_pretrained(directory)
    return str(directory)


def loaded_bytes(directory: str, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, float32 parameters) of the T5 as ``from_pretrained(dtype=)`` loads it."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    parameters = list(model.parameters())
    kept = sum(p.numel() for p in parameters if p.dtype == torch.float32)
    return sum(p.nbytes for p in parameters), kept


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_plan_counts_the_base_as_transformers_loads_it(t5_dir, dtype):
    real, float32 = loaded_bytes(t5_dir, getattr(torch, dtype))
    result = plan(t5_dir, dtype=dtype, r=4)
    assert result.base_bytes == real == result.inference_merged_bytes
    extra = result.lora_frozen_bytes - result.base_bytes
    assert extra == (result.frozen_parameters - result.base_parameters) * result.dtype_bytes
    if dtype == "float16":  # the four wo layers, 37 x 32 each
        assert float32 == 4 * 37 * 32 == result.float32_base_parameters
        assert real == (result.base_parameters - float32) * 2 + float32 * 4


def test_plan_report_shows_the_float32_parameters(t5_dir):
    result = plan(t5_dir, dtype="float16", r=4)
    kept = result.float32_base_parameters
    frozen_line = next(line for line in format_report(result).splitlines() if "frozen x" in line)
    rest = result.frozen_parameters - kept
    total = rest * 2 + kept * 4  # shown in kB below 1 MB (session 38)
    shown = f"{total / 1e3:,.1f} kB" if total < 1e6 else f"{total / 1e6:,.1f} MB"
    assert frozen_line == (
        f"  LoRA: {rest:,} frozen x 2 bytes (float16) + {kept:,} kept in float32 x 4 bytes = "
        f"{shown}"
    )
    assert rest * 2 + kept * 4 == result.lora_frozen_bytes


def test_plan_of_an_int8_rows_base_counts_wo_in_float32(t5_dir):
    """lorakit's int8-rows load (quantized from float32, the rest cast to float16 but for what
    transformers keeps in float32): its parameters' and buffers' bytes, each storage once."""
    from lorakit.quantized.loading import cast_unquantized, quantize_loaded

    model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir, dtype=torch.float32)
    quantize_loaded(model, "int8-rows", None)
    cast_unquantized(model, torch.float16)
    storages = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}
    result = plan(t5_dir, dtype="float16", r=4, quantization="int8-rows")
    assert result.base_bytes == sum(storages.values())
    assert result.float32_base_parameters == 4 * 37 * 32
