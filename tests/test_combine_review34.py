"""Review fixes (session 34) of combining and of loading PEFT files.

- A PEFT adapter on a ``Conv2d`` (ViT's patch projection: lora_A (r, C, kh, kw), lora_B
  (d, r, 1, 1)) crashed every SVD method with a raw RuntimeError and ``cat`` wrote a file
  lorakit refuses to load. Factors that are not 2-D are now refused (``UserError`` naming the
  directory and the module, pointing to peft's add_weighted_adapter); ``lorakit combine`` says
  it on one line, exit 2.
- PEFT's ``save_pretrained(selected_adapters=["b"])`` of a model whose OTHER adapter wraps
  ``lm_head`` writes ``lm_head.base_layer.weight`` into b's file. peft ignores it on a plain
  base and writes it into the base where another adapter wraps ``lm_head``; lorakit refused the
  file in ``combine`` (as a bias / modules_to_save) and in ``load_adapter``. Both now do what
  peft does (left out with a ``StrayBaseWeightWarning``, or written into the wrapped base).
- docs/combining.md lists the DoRA, target_parameters and layer_replication refusals.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel

import lorakit
from lorakit.combining import METHODS
from lorakit.errors import UserError
from lorakit.io.stray_weights import StrayBaseWeightWarning
from tests.cli_runs import run_cli
from tests.tiny_models import llama

ROOT = Path(__file__).resolve().parent.parent
STRAY = "base_model.model.lm_head.base_layer.weight"
WEIGHTS = "adapter_model.safetensors"


def _randomized(model, seed: int, std: float = 0.2):
    """``model`` (a peft model) with every LoRA factor drawn from N(0, std²), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


# --------------------------------------------------------------------------- conv adapters
def _vit() -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=8,
        patch_size=4,
    )
    return ViTModel(config).eval()


@pytest.fixture(scope="module")
def conv_dirs(tmp_path_factory):
    """Two peft adapters of a tiny ViT on its Conv2d patch projection and ``query``."""
    root = tmp_path_factory.mktemp("conv34")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["projection", "query"])
    for name, seed in (("a", 1), ("b", 2)):
        _randomized(peft.get_peft_model(_vit(), config), seed).save_pretrained(root / name)
    return root / "a", root / "b"


CONV = "embeddings.patch_embeddings.projection"


def test_conv_files_hold_4d_factors(conv_dirs):
    tensors = load_file(conv_dirs[0] / WEIGHTS)
    assert list(tensors[f"base_model.model.{CONV}.lora_A.weight"].shape) == [2, 3, 4, 4]
    assert list(tensors[f"base_model.model.{CONV}.lora_B.weight"].shape) == [32, 2, 1, 1]


@pytest.mark.parametrize("method", METHODS)
def test_conv_adapter_is_refused_by_every_method(conv_dirs, method):
    options = {} if method in ("cat", "svd") else {"density": 0.5}
    with pytest.raises(UserError) as caught:
        lorakit.combine(list(conv_dirs), [1.0, 1.0], method=method, **options)
    message = str(caught.value)
    assert type(caught.value) is UserError
    assert str(conv_dirs[0]) in message and f"module {CONV}" in message
    assert "lora_A [2, 3, 4, 4]" in message and "lora_B [32, 2, 1, 1]" in message
    assert "linear / Conv1D / embedding layers only" in message
    assert "add_weighted_adapter" in message


def test_conv_adapter_on_the_command_line_is_one_line_exit_2(conv_dirs, tmp_path, capsys):
    output = tmp_path / "out"
    arguments = ["combine", *conv_dirs, "--method", "svd", "--rank", "2", "--output", output]
    code, out, err = run_cli(capsys, *arguments)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: adapter ")
    assert CONV in lines[0] and "Traceback" not in err
    assert not output.exists()


# --------------------------------------------------------------------------- stray base weights
@pytest.fixture(scope="module")
def stray_dirs(tmp_path_factory):
    """peft adapters "qa" (q_proj, embed_tokens, lm_head) and "vb" (v_proj, embed_tokens) of one
    PeftModel, each saved alone: vb's file carries lm_head.base_layer.weight (qa wraps lm_head).
    Also "vb_changed": vb's file with that stray tensor replaced by other values, so that where
    it goes (left out, or written into the base) shows. Returns (dirs, the peft model)."""
    root = tmp_path_factory.mktemp("stray34")
    targets = {"qa": ["q_proj", "embed_tokens", "lm_head"], "vb": ["v_proj", "embed_tokens"]}
    model = None
    for name, modules in targets.items():
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules)
        if model is None:
            model = peft.get_peft_model(llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    _randomized(model, seed=1)
    dirs = {}
    for name in targets:
        model.save_pretrained(root / "saved", selected_adapters=[name])
        dirs[name] = root / name
        shutil.move(root / "saved" / name, dirs[name])
    changed = root / "vb_changed"
    shutil.copytree(dirs["vb"], changed)
    tensors = load_file(changed / WEIGHTS)
    generator = torch.Generator().manual_seed(5)
    tensors[STRAY] = torch.randn(tensors[STRAY].shape, generator=generator)
    save_file(tensors, changed / WEIGHTS, metadata={"format": "pt"})
    dirs["vb_changed"] = changed
    return dirs, model


def _peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """module -> peft's ``get_delta_weight`` of ``adapter`` (float64), original names, in the
    layout of ``B A`` (an embedding's transposed: PEFT's factors are A (r, num), B (dim, r))."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            found[name] = module.get_delta_weight(adapter).double()
        elif isinstance(module, LoraLayer) and adapter in module.lora_embedding_A:
            found[name] = module.get_delta_weight(adapter).double().T
    return found


def test_vb_file_carries_the_stray_base_weight(stray_dirs):
    dirs, _ = stray_dirs
    tensors = load_file(dirs["vb"] / WEIGHTS)
    assert STRAY in tensors
    assert not any(key.startswith("base_model.model.lm_head.lora") for key in tensors)
    assert torch.equal(tensors[STRAY], llama().lm_head.weight)


def test_combine_leaves_the_stray_out_with_a_warning(stray_dirs):
    dirs, model = stray_dirs
    with pytest.warns(StrayBaseWeightWarning) as caught:
        result = lorakit.combine([dirs["vb"]], [2.0])
    assert len(caught) == 1 and caught[0].filename == __file__  # the caller's line
    message = str(caught[0].message)
    assert STRAY in message and str(dirs["vb"]) in message
    assert "save_embedding_layers=False" in message
    assert set(result.base_weights) == {"model.embed_tokens"}  # vb's own embedding's copy
    expected = _peft_deltas(model, "vb")
    assert set(result.factors) == set(expected)
    for name, delta in expected.items():
        lora_A, lora_B = result.factors[name]
        assert torch.allclose(lora_B.double() @ lora_A.double(), 2.0 * delta, atol=1e-5)


def test_combine_with_the_adapter_that_wraps_lm_head(stray_dirs, tmp_path):
    dirs, model = stray_dirs
    with pytest.warns(StrayBaseWeightWarning):
        result = lorakit.combine([dirs["qa"], dirs["vb"]], [1.0, 1.0])
    assert set(result.base_weights) == {"model.embed_tokens", "lm_head"}  # qa's copies
    assert torch.equal(result.base_weights["lm_head"], llama().lm_head.weight)
    deltas_qa, deltas_vb = _peft_deltas(model, "qa"), _peft_deltas(model, "vb")
    for name in set(deltas_qa) | set(deltas_vb):
        expected = deltas_qa.get(name, 0) + deltas_vb.get(name, 0)
        lora_A, lora_B = result.factors[name]
        assert torch.allclose(lora_B.double() @ lora_A.double(), expected, atol=1e-5)
    result.save(tmp_path / "mix")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StrayBaseWeightWarning)  # the result has no stray
        lorakit.load_adapter(llama(), tmp_path / "mix")


def _logits(model) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_onto_a_plain_base_leaves_the_stray_out_as_peft(stray_dirs):
    dirs, _ = stray_dirs
    with pytest.warns(StrayBaseWeightWarning) as caught:
        ours = lorakit.load_adapter(llama(), dirs["vb_changed"])
    assert caught[0].filename == __file__
    assert STRAY in str(caught[0].message) and "left out" in str(caught[0].message)
    assert torch.equal(ours.lm_head.weight, llama().lm_head.weight)  # not written
    theirs = peft.PeftModel.from_pretrained(llama(), dirs["vb_changed"]).eval()
    assert torch.equal(theirs.base_model.model.lm_head.weight, llama().lm_head.weight)
    assert torch.allclose(_logits(ours), _logits(theirs), atol=1e-5)


def test_load_over_a_wrapped_lm_head_writes_the_stray_as_peft(stray_dirs):
    dirs, _ = stray_dirs
    written = load_file(dirs["vb_changed"] / WEIGHTS)[STRAY]
    ours = lorakit.load_adapter(llama(), dirs["qa"], "qa")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StrayBaseWeightWarning)  # written, not left out
        lorakit.load_adapter(ours, dirs["vb_changed"], "vb")
    theirs = peft.PeftModel.from_pretrained(llama(), dirs["qa"], adapter_name="qa")
    theirs.load_adapter(dirs["vb_changed"], "vb")
    their_base = theirs.base_model.model.lm_head.base_layer.weight
    assert torch.equal(their_base, written)  # (peft writes it into the wrapped base)
    assert torch.equal(ours.lm_head.base_layer.weight, written)
    lorakit.set_active(ours, ["qa", "vb"])
    theirs.base_model.set_adapter(["qa", "vb"])
    assert torch.allclose(_logits(ours.eval()), _logits(theirs.eval()), atol=1e-5)


# --------------------------------------------------------------------------- docs
def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else len(text)]


def test_docs_list_the_dora_parameter_and_replication_refusals():
    text = (ROOT / "docs" / "combining.md").read_text(encoding="utf-8")
    refused = _section(text, "## What is refused")
    weighted = _section(text, "## `add_weighted_adapter`")
    for section in (refused, weighted):
        for field in ("use_dora", "target_parameters", "layer_replication"):
            assert re.search(rf"`{field}", section), (field, section[:80])
    assert "convolution" in refused and "base_layer.weight" in refused
