"""Injection review fixes (round 39), against peft 0.22 as the oracle.

1. ``bias="lora_only"`` with two targeted parameters of one module (a fused-MoE model's
   ``experts.gate_up_proj`` and ``experts.down_proj``, or what ``"all-linear"`` becomes there)
   crashed in the offloaded-bias check (an ``AttributeError`` for ``<experts>.base_layer``, the
   second parameter's layer path, which exists only once wrapped); it now injects as PEFT does,
   and an offloaded module holding such parameters is still refused.
2. ``modules_to_save`` that picks a module and a module inside it (RoBERTa ``SEQ_CLS`` with
   ``["dense"]``: ``classifier`` and ``classifier.dense``) crashed with an ``AttributeError``;
   it is now refused before any change, naming both (PEFT 0.22 writes a file it cannot load).
3. On a fused-MoE model the parameters the MoE conversion generates from transformers-4 names
   were refused as "left out" by ``exclude_modules`` / ``layers_to_transform`` although the user
   wrote no ``target_parameters``; they are now adapted as PEFT adapts them (every layer), and the
   refusal stays for parameters the user wrote.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from accelerate import cpu_offload
from torch import nn
from transformers import (
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import lorakit
from lorakit.errors import TargetModulesError
from tests import tiny_models

IDS = tiny_models.input_ids(batch=2, length=7)
R, ALPHA = 2, 4
PEFT_PREFIX = "base_model.model."


def _peft(base: nn.Module, **fields) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))


def _inject(base: nn.Module, **fields) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields))


def _trainable(model: nn.Module, prefix: str = "") -> set[str]:
    return {n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_as_peft(
    base: nn.Module, inputs=IDS, output=lambda out: out.logits, atol=1e-5, **fields
) -> nn.Module:
    """lorakit and PEFT on ``base`` with ``fields``: the same trainable names and counts, and,
    with lorakit's random factors (B != 0) copied into PEFT's model, the same ``output`` of
    ``inputs`` (logits of ``IDS``). Returns lorakit's model."""
    model, theirs = _inject(base, **fields), _peft(base, **fields)
    assert _trainable(model) == _trainable(theirs, PEFT_PREFIX)
    counts = lorakit.count_parameters(model)
    assert (counts.trainable, counts.total) == theirs.get_nb_trainable_parameters()
    tiny_models.randomize_adapters(model, std=0.2)
    ours = {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert not theirs.load_state_dict(ours, strict=False).unexpected_keys
    got = output(model(inputs))
    assert (got - output(base(inputs))).abs().max() > 1e-2
    torch.testing.assert_close(got, output(theirs(inputs)), atol=atol, rtol=0)
    return model


def _qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    """A tiny Qwen3-MoE: fused experts (``mlp.experts.gate_up_proj`` / ``down_proj``) in both
    layers."""
    torch.manual_seed(seed)
    sizes = dict(tiny_models.DECODER_SIZES, head_dim=16, moe_intermediate_size=32)
    config = Qwen3MoeConfig(
        **sizes, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]
    )
    return Qwen3MoeForCausalLM(config).eval()


# ----------------------------------------- 1. bias="lora_only" with two parameters of one module
@pytest.mark.parametrize(
    "build, fields",
    [
        (
            tiny_models.mixtral,
            dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"]),
        ),
        (_qwen3_moe, dict(target_modules="all-linear")),
    ],
    ids=["mixtral-two-parameters", "qwen3_moe-all-linear"],
)
def test_bias_lora_only_with_two_parameters_of_one_module_matches_peft(build, fields) -> None:
    """Before: ``AttributeError: ... has no attribute `base_layer``` from the offloaded-bias
    check. PEFT 0.22 accepts both."""
    _assert_same_as_peft(build(), r=R, lora_alpha=ALPHA, bias="lora_only", **fields)


class _TwoWeights(nn.Module):
    """``y = x (W_a + W_b)^T + b``: one module holding two 2-D parameters and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_a = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.weight_b = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight_a + self.weight_b).T + self.bias


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _TwoWeights()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


TWO_WEIGHTS = dict(
    r=R, lora_alpha=ALPHA, bias="lora_only", target_parameters=["weight_a", "weight_b"]
)


def test_bias_lora_only_trains_the_bias_of_a_module_with_two_targeted_parameters_as_peft() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    model = _assert_same_as_peft(_Net(), x, lambda out: out, atol=1e-6, **TWO_WEIGHTS)
    assert "block.base_layer.base_layer.bias" in _trainable(model)


def test_an_offloaded_module_with_two_targeted_parameters_is_refused_for_bias_lora_only() -> None:
    """The offloaded-bias refusal still looks at the module holding the parameters (before:
    ``AttributeError`` for ``block.base_layer``); the model is left unchanged."""
    model = _Net()
    cpu_offload(model, execution_device=torch.device("cpu"))
    kinds = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="accelerate offloaded the module") as caught:
        lorakit.inject(model, lorakit.LoraConfig(**TWO_WEIGHTS))
    assert "'block'" in str(caught.value) and "Nothing was changed." in str(caught.value)
    assert kinds == [type(m).__name__ for m in model.modules()]


# ------------------------------------------------ 2. modules_to_save: a module and one inside it
def _roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=128,
        max_position_embeddings=70,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config).eval()


NESTED = [
    (
        _roberta,
        dict(target_modules=["query"], modules_to_save=["dense"], task_type="SEQ_CLS"),
        [
            "modules_to_save picks 'classifier' (entry 'classifier', the head "
            "task_type='SEQ_CLS' adds) and 'classifier.dense' inside it (entry 'dense')",
            "Drop 'dense' from modules_to_save and name the modules it should still copy in "
            "full ('roberta.encoder.layer.0.attention.output.dense', ",
        ],
    ),
    (
        tiny_models.llama,
        dict(target_modules=["q_proj"], modules_to_save=["mlp", "down_proj"]),
        [
            "modules_to_save picks 'model.layers.0.mlp' (entry 'mlp') and "
            "'model.layers.0.mlp.down_proj' inside it (entry 'down_proj')",
            "Drop 'down_proj' from modules_to_save. Nothing was changed.",
        ],
    ),
]


@pytest.mark.parametrize("build, fields, parts", NESTED, ids=["roberta-seq-cls", "llama"])
def test_modules_to_save_picking_a_module_inside_another_is_refused_unchanged(
    build, fields, parts
) -> None:
    """Before: ``AttributeError: ModulesToSave has no attribute ...``. Now one line naming both
    modules, the entries that pick them and the way out; the model is left as it was."""
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m).__name__ for m in model.modules()]
    with pytest.raises(TargetModulesError) as caught:
        lorakit.inject(model, lorakit.LoraConfig(r=R, lora_alpha=ALPHA, **fields))
    message = str(caught.value)
    assert "\n" not in message and all(part in message for part in parts), message
    assert "cannot be copied again" in message
    assert kinds == [type(m).__name__ for m in model.modules()]
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_peft_cannot_load_back_its_own_file_of_nested_modules_to_save(tmp_path) -> None:
    """Why lorakit refuses rather than follows PEFT 0.22: PEFT wraps ``classifier.dense`` a
    second time (inside the copy and the original) and its saved file does not load back."""
    fields = NESTED[0][1]
    theirs = _peft(_roberta(), r=R, lora_alpha=ALPHA, **fields)
    wrapped = [n for n, m in theirs.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert {"classifier", "classifier.dense", "classifier.modules_to_save.default.dense"} <= {
        n.removeprefix(PEFT_PREFIX) for n in wrapped
    }
    theirs.save_pretrained(tmp_path)
    with pytest.raises(KeyError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(_roberta(), tmp_path)


def test_the_way_out_the_refusal_names_matches_peft() -> None:
    """The encoder's ``dense`` layers by full name (the refusal's advice): as in PEFT."""
    dense = [
        f"roberta.encoder.layer.{i}.{part}.dense"
        for i in range(2)
        for part in ("attention.output", "intermediate", "output")
    ]
    base = _roberta()
    fields = dict(r=R, lora_alpha=ALPHA, target_modules=["query"], task_type="SEQ_CLS")
    model, theirs = (
        _inject(base, **fields, modules_to_save=dense),
        _peft(base, **fields, modules_to_save=dense),
    )
    counts = lorakit.count_parameters(model)
    assert (counts.trainable, counts.total) == theirs.get_nb_trainable_parameters()


# --------------------------- 3. parameters the MoE conversion generated follow PEFT, silently
GENERATED = [
    dict(target_modules=["q_proj", "w1", "w3"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules="all-linear", exclude_modules=["model.layers.0.mlp.gate"]),
    dict(target_modules=r".*\.(w1|w3)", exclude_modules=r".*\.0\..*"),
]


@pytest.mark.parametrize("fields", GENERATED, ids=["layers", "all-linear-exclude", "regex"])
def test_generated_parameter_targets_are_adapted_as_peft_adapts_them(fields) -> None:
    """Before: "target_parameters matches ..., which exclude_modules / layers_to_transform
    leaves out", for a target_parameters the user never wrote. PEFT 0.22 applies the
    exclusion and layer selection to target_modules only, and so does lorakit here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: no warning either
        lorakit.inject(tiny_models.mixtral(), lorakit.LoraConfig(r=R, lora_alpha=ALPHA, **fields))
    _assert_same_as_peft(tiny_models.mixtral(), r=R, lora_alpha=ALPHA, **fields)


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(target_parameters=["experts.down_proj"], layers_to_transform=[1]), "down_proj"),
        (dict(target_parameters=["down_proj"], exclude_modules=r".*\.0\..*"), "down_proj"),
    ],
    ids=["layers", "exclude"],
)
def test_parameters_the_user_wrote_are_still_refused_where_left_out(fields, named) -> None:
    """A parameter the user wrote that the selection leaves out: refused as before, also when
    the conversion adds its own entries (``w1`` / ``w3``)."""
    config = lorakit.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_proj", "w1", "w3"], **fields
    )
    with pytest.raises(TargetModulesError, match=rf"target_parameters matches '[^']*{named}'"):
        lorakit.inject(tiny_models.mixtral(), config)
