"""Faults a review found in reading, inspecting, analysing and extracting adapters, each checked
on tiny models (against the real ``peft`` where it applies):

1. an unconverted PEFT LoRA-GA file (its factors fit the base PEFT rewrote) was read as a plain
   LoRA; it is now refused on loading with the conversion hint, as CorDA is;
2. ``extract`` / ``combine --output`` silently replaced an adapter already there;
3. ``analyze --plots DIR`` silently replaced spectra.png / ranks.png;
4. ``inspect`` failed on a PEFT CorDA file (and said "true" for LoRA-GA);
5. ``extract --json`` printed ``fan_in_fan_out`` false while the saved file says true (GPT-2);
6. ``IntrinsicDimension`` of a model without trainable parameters failed with "D=0".
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora.config import LoraGAConfig
from peft.tuners.lora.loraga import preprocess_loraga
from torch import nn

import lorakit
import lorakit.analysis.pairs
import lorakit.analysis.sources
from lorakit.analysis.intrinsic import IntrinsicDimension
from lorakit.cli import main
from lorakit.io.config_json import config_from_json
from lorakit.io.summary import summarize_adapter
from tests import tiny_models

CONVERSION_HINT = "path_initial_model_for_weight_conversion"
OVERWROTE_NOTE = "(fits the base that this init overwrote, not the original weights)"


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys, *argv) -> str:
    """Run ``lorakit ARGV``: exit code 2 and a one-line message, returned."""
    result = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert result == 2 and err.count("\n") == 1, (result, err)
    return err


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _mlp() -> _MLP:
    torch.manual_seed(0)
    return _MLP()


def _peft_loraga() -> tuple[nn.Module, torch.Tensor]:
    """PEFT's LoRA-GA adapter on ``lin0`` of the MLP, its init run on one batch (x, y), and x."""
    base = _mlp()
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["lin0"],
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )
    preprocess_loraga(base, config, train_step=lambda: ((base(x) - y) ** 2).mean().backward())
    return _quiet(lambda: peft.get_peft_model(base, config)), x


@pytest.fixture(scope="module")
def loraga(tmp_path_factory):
    """``(directory, W0, W_res, s B0 A0)``: PEFT's LoRA-GA adapter on ``lin0`` of an MLP, saved
    unconverted right after the init (B0 != 0), with the base weight before and after."""
    weight = _mlp().lin0.weight.detach().clone()
    model, _ = _peft_loraga()
    layer = model.base_model.model.lin0
    residual = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default").detach().clone()
    directory = tmp_path_factory.mktemp("loraga") / "adapter"
    _quiet(lambda: model.save_pretrained(directory))
    return directory, weight, residual, delta


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A PEFT LoRA adapter (r 2, B != 0) on ``lin0`` of the MLP."""
    model = _quiet(
        lambda: peft.get_peft_model(
            _mlp(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"])
        )
    )
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].weight.normal_()
    directory = tmp_path_factory.mktemp("plain") / "adapter"
    _quiet(lambda: model.save_pretrained(directory))
    return directory


def _with_init(source: Path, target: Path, init) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": init}))
    return target


# ------------------------------------------------------------------ 1. LoRA-GA


def test_peft_loraga_rewrites_the_base_so_its_file_only_fits_that_base(loraga):
    """Why the file is refused: PEFT's W_res = W0 - s B0 A0, with s B0 A0 far from 0."""
    _, weight, residual, delta = loraga
    assert float(delta.norm()) > 1e-3 * float(weight.norm())
    torch.testing.assert_close(residual.double(), (weight - delta).double(), rtol=0, atol=1e-6)


def test_an_unconverted_loraga_file_is_refused_on_loading(loraga):
    directory = loraga[0]
    assert json.loads((directory / "adapter_config.json").read_text())["init_lora_weights"] == (
        "lora_ga"
    )
    with pytest.raises(lorakit.AdapterFileError, match=r"init_lora_weights='lora_ga'") as caught:
        lorakit.load_adapter(_mlp(), directory)
    assert CONVERSION_HINT in str(caught.value) and "changes the base weights" in str(caught.value)
    with pytest.raises(lorakit.AdapterFileError, match=CONVERSION_HINT):
        lorakit.PeftModel.from_pretrained(_mlp(), directory)
    with pytest.raises(lorakit.AdapterFileError, match=CONVERSION_HINT):
        lorakit.read_adapter(directory)


def test_analyze_refuses_an_unconverted_loraga_file_before_reading_it(loraga, capsys):
    err = _error(capsys, "analyze", loraga[0], "--json")
    assert "init_lora_weights='lora_ga'" in err and CONVERSION_HINT in err
    assert capsys.readouterr().out == ""


def test_inspect_shows_loraga_as_a_base_changing_init(loraga, capsys, tmp_path):
    assert main(["inspect", str(loraga[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[1].strip() for line in lines if line.startswith("init")] == [
        f"lora_ga {OVERWROTE_NOTE}"
    ]
    described = summarize_adapter(loraga[0])
    as_plain = summarize_adapter(_with_init(loraga[0], tmp_path / "plain", True))
    assert described["init_lora_weights"] == "lora_ga" and as_plain["init_lora_weights"] is True
    differing = {key for key in described if described[key] != as_plain[key]}
    assert differing == {"init_lora_weights", "directory"}
    assert described["ranks"] == {"2": 1} and described["scalings"] == {"2": 1}
    assert described["lora_parameters"] == 2 * (16 + 16)


def test_a_converted_loraga_file_loads_as_peft_computes_it(loraga, tmp_path):
    """The hint works: PEFT's conversion gives a plain LoRA for W0, and lorakit loads it onto
    the original base to the outputs of PEFT's trained model on W_res."""
    model, x = _peft_loraga()
    _quiet(lambda: model.save_pretrained(tmp_path / "initial"))
    with torch.no_grad():  # "training"
        for factors in (model.base_model.model.lin0.lora_A, model.base_model.model.lin0.lora_B):
            factors["default"].weight.add_(0.3 * torch.randn_like(factors["default"].weight))
    _quiet(
        lambda: model.save_pretrained(
            tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
        )
    )
    ours = lorakit.PeftModel.from_pretrained(_mlp(), tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=0, atol=1e-5)
        assert float((ours(x) - _mlp()(x)).abs().max()) > 1e-2  # the update is not trivial


def test_lorakit_config_refuses_loraga_which_it_does_not_implement():
    with pytest.raises(ValueError, match=r"init_lora_weights='lora_ga' is invalid"):
        lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights="lora_ga")
    theirs = peft.LoraConfig(
        target_modules=["lin0"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
    )
    with pytest.raises(ValueError, match=r"init_lora_weights='lora_ga' is invalid"):
        lorakit.LoraConfig(**theirs.to_dict())


@pytest.mark.parametrize(
    ("init", "what", "way_out"),
    [
        ("astra", "Astra", "path_initial_model_for_weight_conversion"),
        ("astra_cached", "Astra", "path_initial_model_for_weight_conversion"),
        ("nora", "NoRA", "reads as a plain LoRA"),
    ],
)
def test_peft_022_inits_are_refused_with_the_way_out_and_their_files_read_as_peft(
    init, what, way_out
):
    """peft 0.22's "astra" (rewrites the base from calibration data, matched by its prefix as
    "corda") and "nora" (unit-norm columns of A, B = 0): not implemented, refused naming them
    and what to do; a file says "astra" only unconverted (refused, as CorDA's) while a "nora"
    file is a plain LoRA (its tensors replace the start)."""
    with pytest.raises(
        ValueError, match=rf"init_lora_weights='{init}' is invalid: it is PEFT's {what}"
    ):
        lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=init)
    with pytest.raises(ValueError, match=way_out):
        lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=init)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0"]}
    text = json.dumps(base | {"init_lora_weights": init})
    if what == "NoRA":
        assert config_from_json(text, "f.json").init_lora_weights is True
    else:
        with pytest.raises(lorakit.AdapterFileError, match="changes the base weights"):
            config_from_json(text, "f.json")


def test_inits_that_only_set_the_start_still_read_as_plain_lora():
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0"]}
    for init in ("orthogonal", "mica", "MiCA"):
        config = config_from_json(json.dumps(base | {"init_lora_weights": init}), "f.json")
        assert config.init_lora_weights is True


# ------------------------------------------------------------------ 4. CorDA in inspect


def test_inspect_describes_a_corda_file_that_loading_still_refuses(plain, capsys, tmp_path):
    corda = _with_init(plain, tmp_path / "corda", "corda")
    assert main(["inspect", str(corda)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[1].strip() for line in out if line.startswith("init")] == [
        f"corda {OVERWROTE_NOTE}"
    ]
    assert main(["inspect", str(corda), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    expected = summarize_adapter(plain)
    assert described == expected | {"directory": str(corda), "init_lora_weights": "corda"}
    err = _error(capsys, "analyze", corda)
    assert "init_lora_weights='corda'" in err and CONVERSION_HINT in err
    with pytest.raises(lorakit.AdapterFileError, match=CONVERSION_HINT):
        lorakit.load_adapter(_mlp(), corda)


# ------------------------------------------------------------------ 2. extract / combine --output


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(lorakit.analysis.pairs, "load_pair", refuse)
    monkeypatch.setattr(lorakit.analysis.sources, "adapter_dir_spectra", refuse)


def _tree(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("held", [["adapter_config.json"], ["adapter_model.safetensors"]])
def test_extract_refuses_an_output_holding_an_adapter(tmp_path, capsys, no_model_loading, held):
    output = tmp_path / "out"
    output.mkdir()
    for name in held:
        (output / name).write_text("an earlier adapter")
    before = _tree(output)
    err = _error(
        capsys, "extract", "--base", "b", "--finetuned", "f", "--output", output, "--rank", "2"
    )
    assert f"extract: --output {output} holds an adapter ({held[0]})" in err
    assert "give another --output, remove it, or pass --overwrite to replace it" in err
    assert _tree(output) == before


def test_combine_refuses_an_output_holding_an_adapter(plain, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(plain, output)
    before = _tree(output)
    err = _error(capsys, "combine", plain, plain, "--output", output)
    assert f"combine: --output {output} holds an adapter (" in err
    assert "adapter_config.json, adapter_model.safetensors" in err
    assert _tree(output) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "notes.txt").write_text("mine")
    assert main(["combine", str(plain), str(plain), "--output", str(fresh)]) == 0
    capsys.readouterr()
    assert (fresh / "notes.txt").read_text() == "mine"
    assert (fresh / "adapter_model.safetensors").is_file()
    # asked for, the earlier adapter is replaced
    assert main(["combine", str(plain), str(plain), "--output", str(output), "--overwrite"]) == 0
    capsys.readouterr()
    assert _tree(output) != before


# ------------------------------------------------------------------ 3. analyze --plots


@pytest.mark.parametrize("existing", ["spectra.png", "ranks.png"])
def test_analyze_refuses_plots_that_would_replace_files(
    plain, tmp_path, capsys, no_model_loading, existing
):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / existing).write_bytes(b"an earlier plot")
    err = _error(capsys, "analyze", plain, "--plots", plots)
    assert f"analyze: --plots {plots} already holds {existing}" in err
    assert [p.name for p in plots.iterdir()] == [existing]
    assert (plots / existing).read_bytes() == b"an earlier plot"


# ------------------------------------------------------------------ 5. extract --json config


def test_extract_json_prints_the_config_as_written_for_gpt2(tmp_path, capsys):
    base = tiny_models.gpt2()
    base.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in tuned.modules():
            if type(module).__name__ == "Conv1D":
                k, d = module.weight.shape  # Conv1D: (in, out)
                left, right = torch.randn(k, 2, generator=generator), torch.randn(2, d)
                module.weight += 0.05 * left @ right
    tuned.save_pretrained(tmp_path / "ft")
    argv = ["extract", "--base", tmp_path / "base", "--finetuned", tmp_path / "ft"]
    argv += ["--output", tmp_path / "ad", "--rank", "2", "--json"]
    assert _quiet(lambda: main([str(a) for a in argv])) == 0
    report = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is True
    assert report["config"] == written
    assert report["config"]["r"] == 2 and report["max_relative_error"] < 1e-5


# ------------------------------------------------------------------ 6. IntrinsicDimension


def test_intrinsic_dimension_of_a_model_with_nothing_trainable_says_why():
    net = nn.Linear(4, 3)
    wrapped = IntrinsicDimension(net, 5, seed=1)
    assert wrapped.projection.total == 15
    with pytest.raises(ValueError, match=r"no parameter to reparametrise: none .* requires grad"):
        IntrinsicDimension(net, 4)
    with pytest.raises(ValueError, match=r"pass parameter_names"):
        IntrinsicDimension(net, 4)
    with pytest.raises(ValueError, match=r"parameter_names is empty"):
        IntrinsicDimension(nn.Linear(4, 3), 4, parameter_names=[])
    again = IntrinsicDimension(net, 4, parameter_names=["weight"], said=False)
    assert again.projection.total == 12 and again.names == ["weight"]
    x = torch.randn(2, 4)
    with torch.no_grad():
        again.theta_d.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        step = again.projection(again.theta_d).view(3, 4)
        expected = x.double() @ (net.weight.double() + step.double()).T + net.bias.double()
        torch.testing.assert_close(again(x).double(), expected, rtol=0, atol=1e-5)
