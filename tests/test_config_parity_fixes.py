"""Review fixes, ``LoraConfig`` against PEFT (the real ``peft`` package is the oracle):

1. PEFT's bookkeeping fields are taken (``LoraConfig(**peft_config.to_dict())``), refused
   features only when set, and ``inference_mode=True`` freezes the adapter as PEFT does;
2. a ``target_modules`` entry matching a module that ``modules_to_save`` (or the task type's
   heads, peft 0.22's) picks leaves it out of LoRA, as PEFT does;
3. "matched no module" says which field took the matches away;
4. ``init_lora_weights`` and "all-linear" read with PEFT's case rules, unknown inits refused in
   files;
5. the default ``target_modules`` table is PEFT's;
6. ``target_parameters`` refuses ``exclude_modules`` / ``layers_to_transform`` it would ignore,
   and ``fan_in_fan_out=True`` on an ``nn.Linear`` warns as in PEFT.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers import DistilBertConfig, DistilBertForSequenceClassification

import lorakit
from lorakit.default_targets import LORAKIT_ONLY
from lorakit.errors import AdapterFileError, TargetModulesError
from lorakit.io.config_json import config_from_json
from lorakit.state import lora_layers, saved_modules
from lorakit.targets import DEFAULT_TARGETS, find_targets
from tests import tiny_models as tm
from tests.peft_versions import peft_saved_names_end_at_a_dot

BASE_FILE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=64
    )
    return DistilBertForSequenceClassification(config).eval()


def _peft_lora_modules(model: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n[len(prefix) :] for n, m in model.named_modules() if isinstance(m, LoraLayer))


# ------------------------------------------------------------------ 1. PEFT's fields


def test_peft_quicktour_config_is_accepted():
    config = lorakit.LoraConfig(
        task_type="CAUSAL_LM", inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1
    )
    assert (config.task_type, config.r, config.lora_alpha, config.lora_dropout) == (
        "CAUSAL_LM",
        8,
        32,
        0.1,
    )
    assert config.inference_mode is False


@pytest.mark.parametrize(
    "changes",
    [{}, {"task_type": peft.TaskType.SEQ_CLS, "target_modules": ["query", "value"], "r": 4}],
)
def test_a_peft_config_converts_with_to_dict(changes):
    theirs = _quiet(lambda: peft.LoraConfig(**changes))
    ours = lorakit.LoraConfig(**theirs.to_dict())
    assert ours == lorakit.LoraConfig(
        **{k: v for k, v in changes.items() if k != "task_type"},
        task_type=changes.get("task_type") and "SEQ_CLS",
    )


@pytest.mark.parametrize(
    "ignored",
    [
        {"revision": "main"},
        {"megatron_config": {"tensor_model_parallel_size": 2}},
        {"megatron_core": "megatron.core"},
        {"runtime_config": {"ephemeral_gpu_offload": True}},
        {"corda_config": {"cache_file": "x"}},
        {"lora_ga_config": {"direction": "ArB2r"}},
        {"qalora_group_size": 32},
        {"auto_mapping": {"base_model_class": "X"}},
        {"peft_version": "0.21.2"},
        {"peft_type": "LORA"},
    ],
)
def test_ignored_peft_fields_are_taken_and_dropped(ignored):
    assert lorakit.LoraConfig(r=4, **ignored) == lorakit.LoraConfig(r=4)


@pytest.mark.parametrize(
    ("name", "on"), [("use_qalora", True), ("ensure_weight_tying", True), ("use_bdlora", {})]
)
def test_refused_peft_fields_only_when_set(name, on):
    off = False if on is True else None
    assert lorakit.LoraConfig(**{name: off}) == lorakit.LoraConfig()
    if on in (True,):
        with pytest.raises(ValueError, match=rf"LoraConfig\.{name}=True is a PEFT feature"):
            lorakit.LoraConfig(**{name: on})


def test_other_peft_types_and_unknown_names_are_still_refused():
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        lorakit.LoraConfig(peft_type="IA3")
    with pytest.raises(TypeError, match="no_such_field"):
        lorakit.LoraConfig(no_such_field=1)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "fields",
    [
        {"target_modules": ["query"], "task_type": "SEQ_CLS"},
        {"target_modules": ["query"], "bias": "all"},
        {"target_modules": ["query"], "bias": "lora_only", "modules_to_save": ["pooler"]},
    ],
)
def test_inference_mode_freezes_the_adapter_as_peft_does(fields):
    theirs = _quiet(
        lambda: peft.get_peft_model(tm.bert(), peft.LoraConfig(inference_mode=True, **fields))
    )
    ours = lorakit.get_peft_model(tm.bert(), lorakit.LoraConfig(inference_mode=True, **fields))
    assert _trainable(ours) == _trainable(theirs)  # biases that bias= trains stay trainable
    assert all(
        not p.requires_grad
        for _, layer in lora_layers(ours.model)
        for p in layer.adapter_parameters("default")
    )
    trained = lorakit.get_peft_model(tm.bert(), lorakit.LoraConfig(**fields))
    assert _trainable(trained) > _trainable(ours)


def test_inference_mode_adapter_saves_a_file_peft_loads(tmp_path):
    model = lorakit.get_peft_model(
        tm.llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True)
    )
    tm.randomize_adapters(model.model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    loaded = _quiet(lambda: peft.PeftModel.from_pretrained(tm.llama(), tmp_path))
    ids = tm.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_get_peft_model_with_a_peft_config_says_how_to_convert():
    with pytest.raises(TypeError, match=r"LoraConfig\(\*\*peft_config\.to_dict\(\)\)"):
        lorakit.get_peft_model(tm.llama(), peft.LoraConfig(target_modules=["q_proj"]))


# ------------------------------------------------------------------ 2. entries inside saved modules


def test_an_entry_naming_a_seq_cls_head_is_left_out_as_peft_022_leaves_it():
    """peft 0.22 adds ``pre_classifier`` to the ``SEQ_CLS`` heads: the ``target_modules`` entry
    ``pre_classifier`` names a module saved whole and is left out of LoRA. peft 0.21 refused
    the config (its ``"classifier"`` picked ``pre_classifier``, a LoRA layer by then, as a
    plain-string ending); lorakit follows 0.22, checked there against the exact lists."""
    fields = {"r": 4, "target_modules": ["q_lin", "pre_classifier"], "task_type": "SEQ_CLS"}
    ours = lorakit.get_peft_model(_distilbert(), lorakit.LoraConfig(**fields))
    adapted = sorted(name for name, _ in lora_layers(ours.model))
    saved = sorted(name for name, _ in saved_modules(ours.model))
    if peft_saved_names_end_at_a_dot():
        theirs = _quiet(lambda: peft.get_peft_model(_distilbert(), peft.LoraConfig(**fields)))
        assert adapted == _peft_lora_modules(theirs)
        assert saved == sorted(n.removeprefix("base_model.model.") for n in _peft_saved(theirs))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    else:
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            _quiet(lambda: peft.get_peft_model(_distilbert(), peft.LoraConfig(**fields)))
    layers = [f"distilbert.transformer.layer.{i}.attention.q_lin" for i in (0, 1)]
    assert adapted == layers and saved == ["classifier", "pre_classifier"]


def _peft_saved(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]


def test_an_entry_only_inside_modules_to_save_is_left_out_as_peft_leaves_it():
    fields = {"r": 4, "target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}
    theirs = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields)))
    ours = lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields))
    assert sorted(name for name, _ in lora_layers(ours)) == _peft_lora_modules(theirs)
    assert [name for name, _ in lora_layers(ours)] == find_targets(
        tm.llama(), lorakit.LoraConfig(**fields)
    )
    assert not any(name.startswith("lm_head") for name in _peft_lora_modules(theirs))
    assert isinstance(ours.lm_head, lorakit.layers.ModulesToSave)


def test_an_entry_also_matching_outside_saved_modules_is_kept_as_peft_keeps_it():
    fields = {"r": 4, "target_modules": ["query", "dense"], "task_type": "SEQ_CLS"}
    theirs = _quiet(lambda: peft.get_peft_model(tm.bert(), peft.LoraConfig(**fields)))
    ours = find_targets(tm.bert(), lorakit.LoraConfig(**fields))
    assert ours == _peft_lora_modules(theirs) or sorted(ours) == _peft_lora_modules(theirs)


# ------------------------------------------------------------------ 3. "matched no module"


def test_no_match_names_exclude_modules_when_it_removed_the_matches():
    config = lorakit.LoraConfig(target_modules=["lm_head"], exclude_modules=["lm_head"])
    with pytest.raises(ValueError) as caught:
        lorakit.inject(tm.llama(), config)
    message = str(caught.value)
    assert "matched modules, but exclude_modules=['lm_head'] removed ['lm_head']" in message
    assert "Closest" not in message


def test_no_match_names_modules_to_save_when_it_removed_the_matches():
    config = lorakit.LoraConfig(target_modules="lm_head", modules_to_save=["lm_head"])
    with pytest.raises(
        ValueError, match=r"modules_to_save entries \['lm_head'\] removed \['lm_head'\]"
    ):
        lorakit.inject(tm.llama(), config)


def test_no_match_names_layers_to_transform_when_it_removed_the_matches():
    config = lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\] removed \['model.layers.0"):
        lorakit.inject(tm.llama(), config)


# ------------------------------------------------------------------ 4. case rules of inits


@pytest.mark.parametrize(("given", "read"), [("OLoRA", "olora"), ("Gaussian", "gaussian")])
def test_inits_peft_reads_case_insensitively(given, read):
    assert lorakit.LoraConfig(init_lora_weights=given).init_lora_weights == read


@pytest.mark.parametrize("given", ["PiSSA", "EVA", "LoftQ"])
def test_inits_peft_reads_exactly_are_refused_in_other_cases(given):
    with pytest.raises(ValueError, match="init_lora_weights"):
        lorakit.LoraConfig(init_lora_weights=given)


def test_a_peft_olora_file_spelled_olora_loads_onto_the_rewritten_base(tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="OLoRA"
    )
    trained = _quiet(lambda: peft.get_peft_model(tm.llama(), config))
    tm.randomize_adapters(trained)
    trained.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "OLoRA"
    )
    ids = tm.input_ids()
    with torch.no_grad():
        expected = _quiet(lambda: peft.PeftModel.from_pretrained(tm.llama(), tmp_path))(ids).logits
        actual = _quiet(lambda: lorakit.PeftModel.from_pretrained(tm.llama(), tmp_path))(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("init", ["orthogonal", "MiCA"])  # (lora_ga changes the base)
def test_peft_inits_that_only_set_the_start_read_as_true(init):
    config = config_from_json(json.dumps(BASE_FILE | {"init_lora_weights": init}), "f.json")
    assert config.init_lora_weights is True


@pytest.mark.parametrize("init", ["banana", "PiSSA", "true", "Orthogonal"])
def test_an_init_peft_does_not_know_is_refused_when_read(init):
    with pytest.raises(AdapterFileError, match=rf"f\.json has init_lora_weights='{init}'"):
        config_from_json(json.dumps(BASE_FILE | {"init_lora_weights": init}), "f.json")


def test_all_linear_in_any_case_selects_what_peft_selects():
    assert lorakit.LoraConfig(target_modules="ALL-Linear").targets_all_linear
    theirs = _quiet(
        lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(target_modules="ALL-LINEAR"))
    )
    ours = find_targets(tm.llama(), lorakit.LoraConfig(target_modules="ALL-LINEAR"))
    assert sorted(ours) == _peft_lora_modules(theirs)


# ------------------------------------------------------------------ 5. PEFT's default targets


def test_the_default_targets_are_peft_table():
    """PEFT's table, and phi3 (lorakit's own: PEFT has no default there)."""
    assert set(DEFAULT_TARGETS) == set(PEFT_DEFAULTS) | set(LORAKIT_ONLY)
    assert not set(LORAKIT_ONLY) & set(PEFT_DEFAULTS)
    for model_type, theirs in PEFT_DEFAULTS.items():
        ours = DEFAULT_TARGETS[model_type]
        if isinstance(theirs, str):
            assert ours == theirs, model_type
        else:
            assert sorted(ours) == sorted(theirs), model_type


@pytest.mark.parametrize("build", [tm.gpt2, tm.bert, tm.llama])
def test_an_unset_target_modules_takes_what_peft_takes(build):
    theirs = _quiet(lambda: peft.get_peft_model(build(), peft.LoraConfig(r=2)))
    assert find_targets(build(), lorakit.LoraConfig(r=2)) == _peft_lora_modules(theirs)


def test_mixtral_default_is_none_like_peft():
    """mixtral (fused experts): PEFT converts the config before its default applies, so an
    unset target_modules adapts no module there."""
    theirs = _quiet(
        lambda: peft.get_peft_model(tm.mixtral(), peft.LoraConfig(r=2, target_parameters=EXPERTS))
    )
    assert theirs.peft_config["default"].target_modules == set()
    assert find_targets(tm.mixtral(), lorakit.LoraConfig(r=2, target_parameters=EXPERTS)) == []


# ------------------------------------------------------------------ 6. target_parameters, fan_in_fan_out


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"exclude_modules": ["experts"]}, "exclude_modules"),
    ],
)
def test_target_parameters_refuse_what_they_would_ignore(changes, field):
    config = lorakit.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, **changes)
    model = tm.mixtral()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetModulesError, match=rf"which {field}=.* leaves out; {field} applies"):
        lorakit.inject(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_parameters_with_an_exclusion_that_leaves_them_be_are_accepted():
    config = lorakit.LoraConfig(
        r=2,
        target_modules=["q_proj", "k_proj"],
        target_parameters=EXPERTS,
        exclude_modules=["k_proj"],
    )
    model = lorakit.inject(tm.mixtral(), config)
    assert "model.layers.0.self_attn.k_proj" not in dict(lora_layers(model))


def test_fan_in_fan_out_on_a_linear_warns_once_as_peft_does():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True"):
        peft.get_peft_model(
            tm.llama(), peft.LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True)
        )
    with pytest.warns(UserWarning) as caught:
        lorakit.inject(
            tm.llama(), lorakit.LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True)
        )
    ours = [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert len(ours) == 1
    assert "'model.layers.0.self_attn.q_proj' (and 1 more) is a torch.nn.Linear" in str(
        ours[0].message
    )


def test_pattern_keys_that_match_no_target_warn_as_peft_warns():
    fields = {
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"q_proj": 2, "q_projj": 8},
        "alpha_pattern": {"up_proj": 3.0, r"layers\.1\.self_attn\.v_proj": 5.0},
    }
    with pytest.warns(RuntimeWarning) as peft_caught:
        peft.get_peft_model(tm.llama(), peft.LoraConfig(**fields))
    with pytest.warns(RuntimeWarning) as caught:
        model = lorakit.inject(tm.llama(), lorakit.LoraConfig(**fields))
    peft_says = " ".join(str(w.message) for w in peft_caught)
    assert "['q_projj']" in peft_says and "['up_proj']" in peft_says  # (the oracle)
    ours = [str(w.message) for w in caught if "match no targeted module" in str(w.message)]
    assert len(ours) == 2
    assert "rank_pattern keys ['q_projj']" in ours[0]
    assert "alpha_pattern keys ['up_proj']" in ours[1]
    layers = dict(lora_layers(model))  # the keys that match still apply
    assert layers["model.layers.0.self_attn.q_proj"].lora_A["default"].weight.shape[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key matches: no warning
        lorakit.inject(
            tm.llama(),
            lorakit.LoraConfig(**{**fields, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}}),
        )
