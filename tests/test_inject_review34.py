"""Review 34, injection and target selection (peft 0.21 as the oracle where it applies):
``modules_to_save`` entries (a task type's absent head skipped, others refused under
``strict_targets`` and skipped without it, each entry checked as a regex), "all-linear" after a
saved ``lm_head``, a model's default regex with ``layers_to_transform``, any finite
``lora_alpha`` (PEFT files with 0 or a negative alpha: forward, merge, serving, combine, GGUF),
the error for a string target that is a name ending, and an unsupported layer type as a
``ValueError``."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import peft
import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, TargetModulesError, UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.state import lora_layers
from tests import tiny_models
from tests.gguf_helpers import qwen2, reader_fields, reader_tensors, saved_adapter
from tests.peft_versions import peft_task_heads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ_CLS = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _saved_names(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if type(m) is ModulesToSave)


# ---------------------------------------------------------------- 1. modules_to_save entries
@pytest.mark.parametrize("strict", [True, False])
def test_seq_cls_config_listing_both_heads_injects_as_peft_does(strict) -> None:
    """PEFT writes modules_to_save=['classifier', 'score'] into every SEQ_CLS config (0.22:
    and 'pre_classifier'); a BERT classifier has no 'score' nor 'pre_classifier': skipped, as
    PEFT skips them, whatever strict_targets says."""
    theirs = peft.get_peft_model(tiny_models.bert(), peft.LoraConfig(**SEQ_CLS))
    recorded = theirs.peft_config["default"].to_dict()
    assert recorded["modules_to_save"] == peft_task_heads("SEQ_CLS")
    written = dict(SEQ_CLS, modules_to_save=["classifier", "score"])
    for config in (lorakit.LoraConfig(**recorded), lorakit.LoraConfig(**written)):
        model = lorakit.inject(tiny_models.bert(), config, strict_targets=strict)
        assert _saved_names(model) == ["classifier"]
        assert _trainable(model) == theirs.get_nb_trainable_parameters()[0]
        assert len(list(lora_layers(model))) == 4


def test_lorakits_own_recorded_seq_cls_config_injects_again() -> None:
    first = lorakit.get_peft_model(tiny_models.bert(), lorakit.LoraConfig(**SEQ_CLS))
    recorded = first.peft_config["default"]
    assert recorded.modules_to_save == ["classifier", "score", "pre_classifier"]  # peft 0.22's
    again = lorakit.inject(tiny_models.bert(), recorded)
    assert _saved_names(again) == ["classifier"]
    assert _trainable(again) == _trainable(first)


def test_other_unmatched_entries_are_refused_strictly_and_skipped_as_peft_otherwise() -> None:
    """'pooler' on a Llama, and 'score' where no task type makes it a head: an entry
    that picks no module is a ValueError under strict_targets (the default), and skipped as PEFT
    skips it with strict_targets=False (same trainable count as PEFT)."""
    cases = [
        (tiny_models.llama, dict(r=4, target_modules=["q_proj"], modules_to_save=["pooler"])),
        (tiny_models.bert, dict(r=4, target_modules=["query"], modules_to_save=["score"])),
    ]
    for build, fields in cases:
        entry = fields["modules_to_save"][0]
        with pytest.raises(ValueError, match=rf"modules_to_save entries \['{entry}'\] match no"):
            lorakit.inject(build(), lorakit.LoraConfig(**fields))
        with pytest.raises(ValueError, match="strict_targets=False"):
            lorakit.get_peft_model(build(), lorakit.LoraConfig(**fields))
        model = lorakit.inject(build(), lorakit.LoraConfig(**fields), strict_targets=False)
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**copy.deepcopy(fields)))
        assert _saved_names(model) == []
        assert _trainable(model) == theirs.get_nb_trainable_parameters()[0]


def test_all_linear_after_a_saved_lm_head_leaves_the_head_out() -> None:
    model = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lorakit.inject(model, config)
    assert isinstance(model.lm_head, ModulesToSave)
    all_linear = lorakit.LoraConfig(r=2, target_modules="all-linear")
    fresh = lorakit.find_targets(tiny_models.llama(), all_linear)
    assert "lm_head" not in fresh and len(fresh) == 14
    assert lorakit.find_targets(model, all_linear) == fresh
    lorakit.inject(model, all_linear, "b")
    assert sorted(n for n, layer in lora_layers(model) if "b" in layer.ranks) == sorted(fresh)
    assert isinstance(model.lm_head, ModulesToSave)
    assert not isinstance(model.lm_head.original_module, LoraLayer)


@pytest.mark.parametrize("entry", [r"([a-z_.0-9]+)+!", "(.*)*lm_head", "lm_head("])
def test_modules_to_save_entries_are_checked_as_regexes(entry, tmp_path) -> None:
    """PEFT matches each entry inside (^|.*\\.)<entry>($|\\..*): a catastrophic pattern would
    hang inject, an invalid one raised a bare re.error. Both are refused at construction, the
    error naming modules_to_save, and so is a file holding one."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"LoraConfig\.modules_to_save entry") as error:
        lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=[entry])
    assert time.perf_counter() - start < 1.0
    assert "as a regex" in str(error.value)
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    path.write_text(json.dumps(fields | {"modules_to_save": [entry]}))
    with pytest.raises(AdapterFileError, match="modules_to_save entry"):
        lorakit.load_adapter(tiny_models.llama(), tmp_path)


def test_plain_and_regex_modules_to_save_entries_are_kept() -> None:
    config = lorakit.LoraConfig(
        target_modules=["q_proj"], modules_to_save=["lm_head", r"model\.norm", "layers.*norm"]
    )
    assert config.modules_to_save == ["lm_head", r"model\.norm", "layers.*norm"]


# ---------------------------------------------------------------- 2. a default regex target
def _gemma4() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        head_dim=8,
        global_head_dim=8,
        max_position_embeddings=64,
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=64,
        num_kv_shared_layers=0,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    config = AutoConfig.for_model(
        "gemma4", text_config=text, vision_config=vision, audio_config=None
    )
    return AutoModelForImageTextToText.from_config(config)


def test_default_regex_target_with_layers_to_transform_is_refused_as_an_explicit_one() -> None:
    """Gemma 4's default target_modules is a regex: layers_to_transform cannot select its layers
    (PEFT silently adapts them all); refused as LoraConfig refuses an explicit regex."""
    model = _gemma4()
    assert len(lorakit.find_targets(model, lorakit.LoraConfig(r=4))) == 4
    with pytest.raises(ValueError, match="cannot be combined with a regex") as error:
        lorakit.inject(model, lorakit.LoraConfig(r=4, layers_to_transform=[1]))
    message = str(error.value)
    assert r"'.*language_model\\..*\\.(q_proj|v_proj)'" in message
    assert "Gemma4ForConditionalGeneration (model type 'gemma4')" in message
    assert "list of module names" in message
    assert not list(lora_layers(model))
    listed = lorakit.LoraConfig(
        r=4, target_modules=["language_model.layers.1.self_attn.q_proj"], layers_to_transform=[1]
    )
    assert lorakit.find_targets(model, listed) == ["model.language_model.layers.1.self_attn.q_proj"]


# ---------------------------------------------------------------- 3. any finite lora_alpha
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("alpha", [-8, 0])
def test_peft_files_with_zero_or_negative_alpha_load_and_merge_as_in_peft(
    alpha, use_rslora, tmp_path
) -> None:
    fields = dict(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    fields |= dict(use_rslora=use_rslora, init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    ids = tiny_models.input_ids(2, 7)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        base = tiny_models.llama()(ids).logits
    assert (alpha == 0) == torch.equal(want, base)
    ours = lorakit.load_adapter(tiny_models.llama(), tmp_path)
    expected_scale = alpha / (2.0 if use_rslora else 4.0)
    assert {layer.scalings["default"] for _, layer in lora_layers(ours)} == {expected_scale}
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-6)
        merged_theirs = theirs.merge_and_unload()(input_ids=ids).logits
        merged_ours = lorakit.merge_and_unload(ours)(ids).logits
    torch.testing.assert_close(merged_ours, merged_theirs, rtol=0, atol=1e-5)


def test_negative_alpha_serves_and_combines_as_the_adapter_runs() -> None:
    reference = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=-8, target_modules=["q_proj", "down_proj"])
    lorakit.inject(reference, config)
    tiny_models.randomize_adapters(reference, std=0.1)
    ids = tiny_models.input_ids(2, 7)
    with torch.no_grad():
        want = reference(ids).logits
        assert not torch.allclose(want, tiny_models.llama()(ids).logits, atol=1e-3)
        served = tiny_models.llama()
        prepare_for_serving(served, ["q_proj", "down_proj"])
        bank = AdapterBank(served, max_rank=4, capacity=1)
        bank.load_from_model("a", reference, "default")
        with routed(bank, torch.full(ids.shape, bank.slot_of("a"))):
            torch.testing.assert_close(served(ids).logits, want, rtol=0, atol=1e-5)
        combined = lorakit.combine(["default"], method="cat", model=reference)
        target = tiny_models.llama()
        combined.add_to(target, "c")
        torch.testing.assert_close(target(ids).logits, want, rtol=0, atol=1e-5)


def test_pissa_with_an_alpha_of_zero_or_below_is_refused() -> None:
    """PiSSA's factors are sqrt(S / s): PEFT's come out NaN / inf for s <= 0."""
    for fields in (dict(lora_alpha=0), dict(alpha_pattern={"q_proj": -1})):
        with pytest.raises(ValueError, match="PiSSA's factors are sqrt"):
            lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa", **fields)
    olora = lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="olora", lora_alpha=-4)
    assert olora.lora_alpha == -4


def _llama_cpp_effect(arrays, alpha: float, gguf_name: str, x: np.ndarray) -> np.ndarray:
    """llama.cpp's LoRA term: ``(alpha / r) B (A x)``, scale 1 when alpha is 0 (qwen2: rows in
    transformers' order)."""
    lora_a, lora_b = arrays[gguf_name + ".lora_a"], arrays[gguf_name + ".lora_b"]
    scale = alpha / lora_b.shape[1] if alpha != 0 else 1.0
    return x @ (scale * lora_b @ lora_a).T


@pytest.mark.parametrize(
    "fields",
    [
        dict(lora_alpha=-8),
        dict(lora_alpha=-8, alpha_pattern={"down_proj": 0}),
        dict(lora_alpha=-6, use_rslora=True, rank_pattern={"v_proj": 2}),
    ],
)
def test_gguf_export_of_zero_or_negative_alphas_keeps_every_modules_update(
    fields, tmp_path
) -> None:
    base = qwen2()
    adapted, directory = saved_adapter(tmp_path / "adapter", base, **fields)
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    arrays, alpha = reader_tensors(done.path), reader_fields(done.path)["adapter.lora.alpha"]
    assert alpha > 0 and done.alpha == alpha
    for name, layer in lora_layers(adapted):
        x = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            effect = (layer(x) - layer.base_layer(x)).double().numpy()
        reference = _llama_cpp_effect(arrays, alpha, done.modules[name], x.double().numpy())
        np.testing.assert_allclose(effect, reference, rtol=1e-5, atol=1e-6)


def test_gguf_export_of_an_adapter_scaled_by_zero_is_refused(tmp_path) -> None:
    _, directory = saved_adapter(tmp_path / "adapter", qwen2(), lora_alpha=0)
    with pytest.raises(UserError, match="lora_alpha is 0 for every module"):
        export_adapter(directory, qwen2(), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


# ---------------------------------------------------------------- 4. errors
@pytest.mark.parametrize("spec", ["q_proj", "self_attn.q_proj"])
def test_a_string_target_that_is_a_name_ending_is_explained(spec) -> None:
    with pytest.raises(ValueError) as error:
        lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=spec))
    message = str(error.value)
    assert "regex matched against the WHOLE module name" in message
    assert f"target_modules=[{spec!r}]" in message
    assert "target_modules=r'.*\\." + spec.replace(".", "\\.") + "'" in message
    assert "Closest module names" not in message


def test_a_string_typo_still_gets_the_closest_names() -> None:
    with pytest.raises(ValueError, match="Closest module names") as error:
        lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=r".*\.q_projj"))
    assert "WHOLE module name" not in str(error.value)


@pytest.mark.parametrize("spec", [["input_layernorm"], ["rotary_emb"], r".*layers\.0\.self_attn"])
def test_an_unsupported_layer_type_is_a_value_error_as_in_peft(spec) -> None:
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(target_modules=spec))
    model = tiny_models.llama()
    with pytest.raises(TargetModulesError, match="which lorakit cannot adapt") as error:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=spec))
    assert isinstance(error.value, ValueError) and not isinstance(error.value, TypeError)
    assert not list(lora_layers(model))
