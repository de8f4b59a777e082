"""Session 38's DoRA review fixes (oracle: peft 0.22 and float64 formulas).

- F1: a base weight with an all-zero output row under a DoRA adapter whose ``s B A`` is zero
  there too (any new adapter, B = 0) has ``n = 0`` and ``f = m / n = 0 / 0``: PEFT computes NaN.
  lorakit refuses it (``dora_norms.ZeroRowNormsError``, a ValueError) at inject and at load, before the model changes,
  naming the rows and the way out; where ``B A`` is not zero on that row (``n > 0``) it works
  and matches PEFT.
- F2 / F3: ``analyze`` and GGUF ``export`` of a DoRA adapter name their ways out (merge, then
  ``analyze --base --finetuned``; a merged GGUF model).
- F4: magnitudes spelled ``<path>.lora_magnitude_vector.weight`` load as peft 0.22 loads them.
- F5: a magnitude that is not 1-D is refused as malformed, not as "another base".
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.analysis.sources import model_dirs_update
from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_adapter_checks import refuse_dora
from lorakit.io.read import read_adapter
from lorakit.io.summary import summarize_adapter
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.state import lora_layers
from tests import tiny_models

pytestmark = pytest.mark.filterwarnings("ignore:adapter .* has no base-model fingerprint")
DORA = dict(r=2, lora_alpha=4, target_modules=["0"], use_dora=True)
WEIGHTS = "adapter_model.safetensors"


def _zero_row_base(rows=(3,), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        base[0].weight[list(rows)] = 0.0  # pruned / zero-padded output rows
    return base


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return model[0] is module and not list(lora_layers(model)) and _same_state(model, before)


# ------------------------------------------------------------------------------------ F1
def test_peft_computes_nan_on_a_zero_row_so_lorakit_refuses_at_inject() -> None:
    base, x = _zero_row_base(), torch.randn(2, 16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DORA))
    with torch.no_grad():
        assert torch.isnan(theirs(x)[:, 3]).all()  # the oracle: f = 0 / 0
    before, module = _snapshot(base), base[0]
    with pytest.raises(ValueError) as caught:
        lorakit.inject(base, lorakit.LoraConfig(**DORA))
    message = str(caught.value)
    assert type(caught.value).__name__ == "ZeroRowNormsError" and caught.value.rows == [3]
    for part in ("layer '0'", "'default'", "1 of the 8 output rows", "row 3", "target_modules"):
        assert part in message
    assert "use_dora=False" in message
    assert _unchanged(base, before, module)


def test_many_zero_rows_are_counted_and_the_first_five_named() -> None:
    base = _zero_row_base(rows=(0, 2, 4, 5, 6, 7))
    with pytest.raises(ValueError, match=r"6 of the 8 output rows .*rows 0, 2, 4, 5, 6, \.\.\."):
        lorakit.inject(base, lorakit.LoraConfig(**DORA))


def test_conv1d_zero_row_is_refused_and_a_second_adapter_leaves_the_first() -> None:
    model = tiny_models.gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[:, 5] = 0.0  # Conv1D: (k, d), output row 5
    config = dict(r=2, lora_alpha=4, target_modules=["c_fc"], use_dora=True, fan_in_fan_out=True)
    lorakit.inject(model, lorakit.LoraConfig(**config, init_lora_weights=False), "first")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'second'.*row 5"):
        lorakit.inject(model, lorakit.LoraConfig(**config), "second")
    assert _same_state(model, before)


def test_a_zero_row_with_nonzero_BA_is_accepted_and_matches_peft() -> None:
    """``init_lora_weights=False``: B != 0, so n = s ||B_3 A|| > 0 on the zero row: finite."""
    base, x = _zero_row_base(), torch.randn(2, 16)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**DORA, init_lora_weights=False)
    )
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**DORA, init_lora_weights=False))
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(ours[0], name)["default"].weight.copy_(
                getattr(theirs.base_model.model[0], name)["default"].weight
            )
        m = theirs.base_model.model[0].lora_magnitude_vector["default"].weight
        ours[0].lora_magnitude_vector["default"].weight.copy_(m)
        expected, got = theirs(x), ours(x)
    assert torch.isfinite(got).all() and m[3] > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_an_untrained_peft_file_on_a_zero_row_base_raises_at_its_first_forward(tmp_path) -> None:
    base = _zero_row_base()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DORA))
    theirs.save_pretrained(tmp_path)  # m_3 = 0, B = 0: NaN in peft once loaded
    with torch.no_grad():
        assert torch.isnan(theirs(torch.randn(2, 16))[:, 3]).all()
    ours = lorakit.load_adapter(base, tmp_path)
    with pytest.raises(ValueError) as caught:
        ours(torch.randn(2, 16))
    message = str(caught.value)
    for part in ("'default'", "1 of the 8 output rows", "row 3", "target_modules"):
        assert part in message


def test_a_trained_peft_file_on_a_zero_row_base_loads_and_matches_peft(tmp_path) -> None:
    base, x = _zero_row_base(), torch.randn(2, 16)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**DORA, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_a_zero_norm_met_later_raises_instead_of_nan_and_merge_says_why() -> None:
    """A forward and a merge of a layer whose n_3 became 0 raise the same error (before: NaN
    outputs, and merge blamed the adapter for holding non-finite values)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lorakit.inject(model, lorakit.LoraConfig(**DORA))
    with torch.no_grad():
        model[0].base_layer.weight[3] = 0.0
        model[0].lora_magnitude_vector["default"].weight[3] = 0.0
    with pytest.raises(ValueError, match=r"'default'.*row 3"):
        model(torch.randn(2, 16))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="row 3"):
        lorakit.merge(model)
    assert _same_state(model, before)


def test_zero_rows_agrees_with_the_definition() -> None:
    from lorakit.dora_norms import zero_rows

    weight = torch.randn(40, 7, dtype=torch.float64)
    weight[[0, 9, 39]] = 0.0
    weight[12, 3] = 1e-300  # tiny, not zero
    assert zero_rows(weight).tolist() == [0, 9, 39]
    assert zero_rows(weight.T.contiguous(), fan_in_fan_out=True).tolist() == [0, 9, 39]


# ------------------------------------------------------------------------------- F2, F3
@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory):
    """``(base dir, adapter dir, peft model)``: a tiny Llama's PEFT DoRA adapter, random."""
    root = tmp_path_factory.mktemp("llama_dora")
    base = tiny_models.llama()
    base.save_pretrained(root / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    tiny_models.randomize_adapters(theirs, std=0.1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
    theirs.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", theirs.eval()


def test_analyze_refusal_names_the_way_out_and_that_way_works(llama_dora, tmp_path) -> None:
    base_dir, adapter_dir, theirs = llama_dora
    from lorakit.analysis.sources import adapter_dir_spectra

    with pytest.raises(UserError) as caught:
        adapter_dir_spectra(adapter_dir)
    assert "lorakit merge --model MODEL --adapter DIR" in str(caught.value)
    assert "lorakit analyze --base MODEL --finetuned MERGED" in str(caught.value)
    merged = copy.deepcopy(theirs).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    spectra, _ = model_dirs_update(base_dir, tmp_path / "merged", progress=False)
    found = {s.name: s for s in spectra}
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    W0 = layer.base_layer.weight.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    m = layer.lora_magnitude_vector["default"].weight.double()
    full = W0 + 2.0 * B @ A
    update = (m / torch.linalg.vector_norm(full, dim=1))[:, None] * full - W0  # float64
    expected = torch.linalg.svdvals(update)
    name = next(n for n in found if n.endswith("layers.0.self_attn.q_proj"))
    got = torch.as_tensor(found[name].singular_values, dtype=torch.float64)
    assert got.numel() == min(64, expected.numel())
    torch.testing.assert_close(got, expected[: got.numel()], rtol=1e-4, atol=1e-6)


def test_docs_no_longer_say_analyze_reads_s_B_A() -> None:
    text = (Path(__file__).parents[1] / "docs" / "dora.md").read_text()
    assert "analyses `s B A` only" not in text and "--finetuned MERGED" in text


def test_gguf_export_refusal_names_the_merged_model_way_out(llama_dora) -> None:
    _, adapter_dir, _ = llama_dora
    with pytest.raises(UserError) as caught:
        refuse_dora(adapter_dir)
    assert f"lorakit export MODEL --adapter {adapter_dir} --format gguf" in str(caught.value)


# ------------------------------------------------------------------------------- F4, F5
def _respelled(adapter_dir, target_dir, change) -> None:
    target_dir.mkdir()
    (target_dir / "adapter_config.json").write_text(
        (adapter_dir / "adapter_config.json").read_text()
    )
    save_file(change(load_file(adapter_dir / WEIGHTS)), target_dir / WEIGHTS)


def _with_weight_suffix(tensors):
    return {
        (k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in tensors.items()
    }


def test_weight_spelled_magnitudes_load_as_peft_loads_them(llama_dora, tmp_path) -> None:
    _, adapter_dir, theirs = llama_dora
    _respelled(adapter_dir, tmp_path / "a", _with_weight_suffix)
    ids = tiny_models.input_ids(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "a").eval()
    ours = lorakit.load_adapter(tiny_models.llama(), tmp_path / "a")
    with torch.no_grad():
        expected = reloaded(ids).logits
        torch.testing.assert_close(expected, theirs(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_weight_spelled_magnitudes_read_alike_for_inspect_and_serve(llama_dora, tmp_path) -> None:
    _, adapter_dir, theirs = llama_dora
    _respelled(adapter_dir, tmp_path / "a", _with_weight_suffix)
    plain, spelled = summarize_adapter(adapter_dir), summarize_adapter(tmp_path / "a")
    for summary in (plain, spelled):
        summary.pop("directory"), summary.pop("file_bytes")  # (longer keys: more bytes)
    assert spelled == plain and plain["dora_magnitude_parameters"] > 0
    adapter = read_adapter(tmp_path / "a")
    assert adapter.tensors.keys() == read_adapter(adapter_dir).tensors.keys()
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj", "v_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=1)
    slot = bank.load("dora", adapter.config, adapter.tensors)
    ids = tiny_models.input_ids(1, 6)
    with torch.no_grad(), routed(bank, torch.full(ids.shape, slot)):
        served = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(served, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_both_spellings_of_one_magnitude_are_refused(llama_dora, tmp_path) -> None:
    _, adapter_dir, _ = llama_dora

    def doubled(tensors):
        key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
        return {**tensors, key + ".weight": tensors[key].clone()}

    _respelled(adapter_dir, tmp_path / "a", doubled)
    with pytest.raises(AdapterFileError, match="two spellings of one DoRA magnitude"):
        lorakit.load_adapter(tiny_models.llama(), tmp_path / "a")


@pytest.mark.parametrize("reshape", [lambda m: m[:, None], lambda m: m[None, :], lambda m: m[0]])
def test_a_magnitude_that_is_not_1d_is_called_malformed(llama_dora, tmp_path, reshape) -> None:
    _, adapter_dir, _ = llama_dora
    key = sorted(
        k for k in load_file(adapter_dir / WEIGHTS) if k.endswith("lora_magnitude_vector")
    )[0]
    _respelled(adapter_dir, tmp_path / "a", lambda t: {**t, key: reshape(t[key]).clone()})
    model = tiny_models.llama()
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(model, tmp_path / "a")
    message = str(caught.value)
    assert "must be 1-D, of shape [d]" in message
    assert "other dimensions" not in message and key in message
    assert not list(lora_layers(model))
