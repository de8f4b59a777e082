"""PiSSA / OLoRA adapters saved WITHOUT conversion: their A and B only fit the residual base
``W0 - s B0 A0`` the init made. ``load_adapter`` reruns the init as PEFT does; every reader that
takes the factors as a plain LoRA of the original base (the server, GGUF export, combining,
``lorakit analyze``) refuses them before any work, naming the file and the way out
(``lorakit.io.read.refuse_residual_base_factors``), and still takes the converted files.

Real files: PEFT's ``get_peft_model(..., LoraConfig(init_lora_weights="pissa" / "olora"))``
with B moved off its init, ``save_pretrained`` without and with
``path_initial_model_for_weight_conversion``; and lorakit's own saves of the same.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.analysis.sources import adapter_dir_spectra
from lorakit.cli import build_parser, main
from lorakit.combining import combine
from lorakit.commands.serve import build
from lorakit.errors import AdapterFileError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.io import read as read_module
from lorakit.io import tensors as tensors_module
from lorakit.io.read import read_adapter_header, residual_base_init
from tests import serving, tiny_models
from tests.serving import AUTH, Served, assert_error, completion

INITS = ["pissa", "olora"]
TARGETS = ["q_proj", "v_proj"]
REFUSAL = r"init_lora_weights='{init}' means its lora_A / lora_B belong to the PiSSA/OLoRA residual"
WAY_OUT = ("path_initial_model_for_weight_conversion", "lorakit.save_adapter(model, out, initial")


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on PiSSA; files without a fingerprint
        return function(*args, **kwargs)


def _move_B(model, seed: int) -> None:
    """B off its init (stands in for training): the factors differ from what the init gives."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def peft_files(root, base, init: str, r: int):
    """``root/initial`` (peft's recipe: saved right after the init, saying true),
    ``root/unconverted`` (saying ``init``) and ``root/converted`` (rank 2r, saying true)."""
    config = peft.LoraConfig(init_lora_weights=init, target_modules=TARGETS, r=r, lora_alpha=2 * r)
    model = _quiet(peft.get_peft_model, base, config)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(root / "initial")
    model.peft_config["default"].init_lora_weights = init
    _move_B(model, seed=7)
    model.save_pretrained(root / "unconverted")
    _quiet(
        model.save_pretrained,
        root / "converted",
        path_initial_model_for_weight_conversion=str(root / "initial"),
    )
    configs = {
        kind: json.loads((root / kind / "adapter_config.json").read_text())
        for kind in ("unconverted", "converted")
    }
    assert configs["unconverted"]["init_lora_weights"] == init
    assert configs["converted"]["init_lora_weights"] is True and configs["converted"]["r"] == 2 * r
    return root


def lorakit_files(root, base, init: str, r: int):
    """The same with lorakit: ``root/unconverted`` (config true, the init in the header
    metadata, the residual base's fingerprint) and ``root/converted``; returns the trained
    model too."""
    config = lorakit.LoraConfig(
        init_lora_weights=init, target_modules=TARGETS, r=r, lora_alpha=2 * r
    )
    model = lorakit.inject(base, config)
    lorakit.save_adapter(model, root / "initial")
    _move_B(model, seed=8)
    lorakit.save_adapter(model, root / "unconverted")
    lorakit.save_adapter(model, root / "converted", initial_adapter=root / "initial")
    saved = json.loads((root / "unconverted" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True
    assert read_adapter_header(root / "unconverted").metadata["lorakit.base_changing_init"] == init
    return root, model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{(maker, init): root}`` for maker "peft" / "lorakit", r=4, on the tiny Llama; and a
    plain lorakit adapter ("plain") of the same base to combine with."""
    root = tmp_path_factory.mktemp("base_changing")
    made = {}
    for init in INITS:
        made["peft", init] = peft_files(root / f"peft-{init}", tiny_models.llama(), init, r=4)
        made["lorakit", init], _ = lorakit_files(
            root / f"lorakit-{init}", tiny_models.llama(), init, r=4
        )
    plain = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=TARGETS))
    tiny_models.randomize_adapters(plain, std=0.2)
    made["plain"] = lorakit.save_adapter(plain, root / "plain")
    return made


@pytest.fixture
def data_reads(monkeypatch):
    """The weights files whose tensor DATA is read (a refusal from the header reads none)."""
    reads = []
    real = tensors_module.read_safetensors
    counting = lambda path: reads.append(path) or real(path)  # noqa: E731
    monkeypatch.setattr(tensors_module, "read_safetensors", counting)
    monkeypatch.setattr(read_module, "read_safetensors", counting)
    return reads


def _refusal(init: str) -> str:
    return REFUSAL.format(init=init)


def _check_message(text: str, directory, init: str, maker: str) -> None:
    assert f"adapter {directory}" in text, text
    assert f"init_lora_weights='{init}' means" in text and "residual base" in text, text
    said = "PEFT saved it without conversion" if maker == "peft" else "lorakit saved it without"
    assert said in text, text
    for words in WAY_OUT:
        assert words in text, text


# ------------------------------------------------------------------------------ the files
@pytest.mark.parametrize("init", INITS)
def test_only_the_unconverted_files_are_reported(files, init):
    for maker in ("peft", "lorakit"):
        unconverted = read_adapter_header(files[maker, init] / "unconverted")
        assert residual_base_init(unconverted)[0] == init
        assert residual_base_init(read_adapter_header(files[maker, init] / "converted")) is None
    # lorakit's own carry the residual base's fingerprint: a reader checking it lets them pass
    mine = read_adapter_header(files["lorakit", init] / "unconverted")
    assert mine.fingerprint and residual_base_init(mine, fingerprint_checked=True) is None
    peft_file = read_adapter_header(files["peft", init] / "unconverted")
    assert residual_base_init(peft_file, fingerprint_checked=True)[0] == init
    assert residual_base_init(read_adapter_header(files["plain"])) is None


@pytest.mark.parametrize("init", INITS)
def test_load_adapter_still_reruns_the_init_as_peft_does(files, init):
    """Unchanged: the one reader that can change the base loads PEFT's file as PEFT does."""
    directory = files["peft", init] / "unconverted"
    torch.manual_seed(0)
    theirs = _quiet(peft.PeftModel.from_pretrained, tiny_models.llama(), directory)
    ours = _quiet(lorakit.load_adapter, tiny_models.llama(), directory)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ GGUF export
@pytest.mark.parametrize("maker", ["peft", "lorakit"])
@pytest.mark.parametrize("init", INITS)
def test_gguf_export_refuses_before_reading_or_writing(files, tmp_path, data_reads, init, maker):
    directory = files[maker, init] / "unconverted"
    output = tmp_path / "a.gguf"
    with pytest.raises(AdapterFileError, match=_refusal(init)) as caught:
        export_adapter(directory, tiny_models.llama(), output)
    _check_message(str(caught.value), directory, init, maker)
    assert "exporting it as a GGUF LoRA" in str(caught.value)
    assert data_reads == [] and not output.exists()
    done = export_adapter(files[maker, init] / "converted", tiny_models.llama(), output)
    assert done.path.is_file() and len(done.modules) == 4


@pytest.mark.parametrize("init", INITS)
def test_lorakit_export_command_refuses_in_one_line(files, tmp_path, model_dir, capsys, init):
    directory = files["peft", init] / "unconverted"
    output = tmp_path / "a.gguf"
    args = ["export", str(directory), "--model", str(model_dir), "--format", "gguf"]
    assert main([*args, "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lorakit: error: adapter ") and len(error.splitlines()) == 1
    _check_message(error, directory, init, "peft")
    assert not output.exists()


# ------------------------------------------------------------------------------ combining
@pytest.mark.parametrize("maker", ["peft", "lorakit"])
@pytest.mark.parametrize("init", INITS)
def test_combine_refuses_before_reading_any_tensor(files, data_reads, init, maker):
    directory = files[maker, init] / "unconverted"
    with pytest.raises(AdapterFileError, match=_refusal(init)) as caught:
        combine([files["plain"], directory], [0.5, 0.5])  # the good one first: still no read
    _check_message(str(caught.value), directory, init, maker)
    assert "combining" in str(caught.value)
    assert data_reads == []
    result = combine([files["plain"], files[maker, init] / "converted"], [0.5, 0.5])
    assert sorted(result.factors) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in TARGETS
    )


@pytest.mark.parametrize("init", INITS)
def test_lorakit_combine_command_writes_nothing(files, tmp_path, capsys, init):
    directory = files["peft", init] / "unconverted"
    output = tmp_path / "out"
    assert main(["combine", str(files["plain"]), str(directory), "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    _check_message(error, directory, init, "peft")
    assert not output.exists()
    converted = files["peft", init] / "converted"
    assert main(["combine", str(files["plain"]), str(converted), "--output", str(output)]) == 0
    assert (output / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------ analysis
@pytest.mark.parametrize("maker", ["peft", "lorakit"])
@pytest.mark.parametrize("init", INITS)
def test_analysis_refuses_before_reading_the_tensors(files, data_reads, init, maker):
    directory = files[maker, init] / "unconverted"
    with pytest.raises(AdapterFileError, match=_refusal(init)) as caught:
        adapter_dir_spectra(directory)
    _check_message(str(caught.value), directory, init, maker)
    assert "analysing its s B A" in str(caught.value)
    assert data_reads == []
    assert len(adapter_dir_spectra(files[maker, init] / "converted")) == 4


@pytest.mark.parametrize("init", INITS)
def test_lorakit_analyze_command_refuses_in_one_line(files, tmp_path, capsys, init):
    directory = files["peft", init] / "unconverted"
    plots = tmp_path / "plots"
    assert main(["analyze", str(directory), "--plots", str(plots)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    _check_message(error, directory, init, "peft")
    assert not plots.exists()
    assert main(["analyze", str(files["peft", init] / "converted"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 4


def test_a_randomised_pissa_file_is_refused_too(files, tmp_path):
    """``"pissa_niter_K"`` (randomised SVD): the same residual-base factors."""
    directory = tmp_path / "niter"
    shutil.copytree(files["peft", "pissa"] / "unconverted", directory)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"init_lora_weights": "pissa_niter_4"}
    config_path.write_text(json.dumps(config))
    for reader in (adapter_dir_spectra, lambda d: combine([d])):
        with pytest.raises(AdapterFileError, match=_refusal("pissa_niter_4")):
            reader(directory)
    with pytest.raises(AdapterFileError, match=_refusal("pissa_niter_4")):
        export_adapter(directory, tiny_models.llama(), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


# ------------------------------------------------------------------------------ LoftQ
def test_loftq_files_are_not_refused(files, tmp_path):
    """A LoftQ file's factors are a plain LoRA of its quantized base, a model of its own: the
    readers take it as they did (``load_adapter`` loads it as is)."""
    directory = tmp_path / "loftq"
    shutil.copytree(files["peft", "pissa"] / "converted", directory)  # peft's: no config copy
    config_path = directory / "adapter_config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"init_lora_weights": "loftq"})
    )
    assert read_adapter_header(directory).config.init_lora_weights == "loftq"
    assert residual_base_init(read_adapter_header(directory)) is None
    assert export_adapter(directory, tiny_models.llama(), tmp_path / "a.gguf").path.is_file()
    assert len(adapter_dir_spectra(directory)) == 4
    combine([files["plain"], directory])


# ------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def served_files(adapter_files, tmp_path_factory):
    """The serving tests' adapters (ad0..ad3, r=2 on q_proj/v_proj) plus PEFT's r=2 PiSSA and
    OLoRA files, unconverted and converted (rank 4, the bank's max_rank), made on the served
    base (``serving.base_model``), and lorakit's own unconverted PiSSA save of that base."""
    _, tokenizer = adapter_files
    made = tmp_path_factory.mktemp("served_base_changing")
    for init in INITS:
        peft_files(made / f"peft-{init}", serving.base_model(tokenizer), init, r=2)
    _, model = lorakit_files(made / "lorakit-pissa", serving.base_model(tokenizer), "pissa", r=2)
    residual = lorakit.unload(copy.deepcopy(model))
    return made, residual


def _served(adapter_files, served_files, tmp_path, base=None, monkeypatch=None) -> Served:
    """A server over a copy of ad0..ad3 plus ``<maker>-<init>`` (unconverted) and
    ``<maker>-<init>-converted`` for each file made."""
    root, tokenizer = adapter_files
    made, _ = served_files
    shutil.copytree(root / "adapters", tmp_path / "adapters")
    for source in sorted(made.iterdir()):
        shutil.copytree(source / "unconverted", tmp_path / "adapters" / source.name)
        shutil.copytree(source / "converted", tmp_path / "adapters" / f"{source.name}-converted")
    if base is not None:
        monkeypatch.setattr(serving, "base_model", lambda _tokenizer: copy.deepcopy(base))
    return Served(tmp_path, tokenizer)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("init", INITS)
def test_server_refuses_a_peft_file_with_a_400_and_serves_the_others(
    adapter_files, served_files, tmp_path, init
):
    served = _served(adapter_files, served_files, tmp_path)
    name = f"peft-{init}"
    directory = name  # relative to --adapters: clients never see the server's own paths
    with served.client:
        body = {"lora_name": "x", "lora_path": name}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        error = assert_error(response, 400, "lora_path", f"adapter {directory}", *WAY_OUT)
        _check_message(error["message"], directory, init, "peft")
        assert str(served.root.resolve()) not in error["message"]
        assert "serving it on the server's shared, unchanged base model" in error["message"]
        lazily = served.post("/v1/completions", completion(model=name))  # registered at start
        assert_error(
            lazily, 400, "model", f"adapter {directory}", _refusal(init).split(" means")[0]
        )
        assert served.bank.names() == [] and "x" not in served.model_ids()
        for other in ("ad0", f"{name}-converted"):
            answer = served.post("/v1/completions", completion(model=other))
            assert answer.status_code == 200, answer.text
        body = {"lora_name": "y", "lora_path": f"{name}-converted"}
        assert served.post("/v1/load_lora_adapter", body, AUTH).status_code == 200
        assert served.post("/v1/completions", completion(model="y")).status_code == 200
        assert served.post("/v1/completions", completion(model="ad1")).status_code == 200


@pytest.mark.usefixtures("one_torch_thread")
def test_server_start_up_skips_peft_files_and_names_why(
    adapter_files, served_files, tmp_path, caplog
):
    root, tokenizer = adapter_files
    made, _ = served_files
    tiny_models.save_llama_with_tokenizer(tmp_path / "model", tokenizer)
    shutil.copytree(root / "adapters" / "ad1", tmp_path / "adapters" / "good")
    shutil.copytree(made / "peft-pissa" / "unconverted", tmp_path / "adapters" / "pissa")
    shutil.copytree(made / "peft-olora" / "converted", tmp_path / "adapters" / "olora-converted")
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters")]
    )
    with caplog.at_level("INFO"):
        app = build(args)
    warning = next(r.getMessage() for r in caplog.records if "'pissa'" in r.getMessage())
    assert "not serving adapter 'pissa'" in warning
    _check_message(warning, (tmp_path / "adapters" / "pissa").resolve(), "pissa", "peft")
    summary = next(r.getMessage() for r in caplog.records if " served (" in r.getMessage())
    assert "2 served (good, olora-converted), 1 skipped" in summary
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert ids == ["model", "good", "olora-converted"]
        for model in ("good", "olora-converted"):
            response = client.post("/v1/completions", json=completion(model=model))
            assert response.status_code == 200, response.text


@pytest.mark.usefixtures("one_torch_thread")
def test_server_keeps_serving_lorakit_unconverted_saves_on_their_residual_base(
    adapter_files, served_files, tmp_path, monkeypatch
):
    """lorakit's own unconverted save carries the residual base's fingerprint, which the server
    checks: served on that residual model, refused on the original base (as before)."""
    _, residual = served_files
    on_residual = _served(adapter_files, served_files, tmp_path / "r", residual, monkeypatch)
    with on_residual.client:
        response = on_residual.post("/v1/completions", completion(model="lorakit-pissa"))
        assert response.status_code == 200, response.text
    monkeypatch.undo()
    on_original = _served(adapter_files, served_files, tmp_path / "o")
    with on_original.client:
        response = on_original.post("/v1/completions", completion(model="lorakit-pissa"))
        assert_error(response, 400, "model", "different base weights")
        converted = on_original.post("/v1/completions", completion(model="lorakit-pissa-converted"))
        assert converted.status_code == 200, converted.text
