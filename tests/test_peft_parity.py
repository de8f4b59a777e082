"""lorakit against the real ``peft`` package (the oracle): same adapted modules, same parameter
counts and the same outputs with identical (non-zero) adapter weights, over a table of tiny models
and configs."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit.state import lora_layers
from tests import tiny_models

QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
LAYERS = {"llama": "layers", "gpt2": "h", "bert": "layer"}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}

CONFIGS = {
    "qv": lambda arch: dict(r=4, lora_alpha=8, target_modules=QV[arch]),
    "all-linear": lambda arch: dict(r=4, lora_alpha=16, target_modules="all-linear"),
    "patterns": lambda arch: dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={QV[arch][0]: 2, r"\d\.mlp\..*": 6} if arch == "llama" else {QV[arch][0]: 2},
        alpha_pattern={QV[arch][-1]: 3},
    ),
    "rslora": lambda arch: dict(r=8, lora_alpha=4, use_rslora=True, target_modules=QV[arch]),
    "layers": lambda arch: dict(
        r=4,
        lora_alpha=8,
        target_modules=QV[arch],
        layers_to_transform=[1],
        layers_pattern=LAYERS[arch],
    ),
    "bias-all": lambda arch: dict(r=4, lora_alpha=8, target_modules=QV[arch], bias="all"),
    "bias-lora-only": lambda arch: dict(
        r=4, lora_alpha=8, target_modules=QV[arch], bias="lora_only"
    ),
    "embedding": lambda arch: dict(r=4, lora_alpha=8, target_modules=[EMBEDDING[arch], *QV[arch]]),
    "regex": lambda arch: dict(r=4, lora_alpha=8, target_modules=rf".*\.{QV[arch][0]}"),
}


def _pair(arch: str, config_name: str):
    fields = CONFIGS[config_name](arch) | {"task_type": TASK[arch], "init_lora_weights": False}
    ours = lorakit.inject(tiny_models.BUILDERS[arch](), lorakit.LoraConfig(**fields))
    theirs = peft.get_peft_model(tiny_models.BUILDERS[arch](), peft.LoraConfig(**fields))
    tiny_models.randomize_adapters(ours, std=0.3)
    theirs_state = theirs.state_dict()
    copied = {}
    for key, value in ours.state_dict().items():
        if "lora_" in key or "modules_to_save" in key:
            peft_key = "base_model.model." + key
            assert peft_key in theirs_state, f"{peft_key} missing in peft's model"
            copied[peft_key] = value
    theirs.load_state_dict(copied, strict=False)
    return ours.eval(), theirs.eval()


def _adapted_names(model: torch.nn.Module, prefix: str = "") -> set[str]:
    return {
        name.removeprefix(prefix)
        for name, module in model.named_modules()
        if isinstance(module, (lorakit.layers.LoraLayer, peft.tuners.lora.LoraLayer))
    }


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_same_modules_counts_and_outputs_as_peft(arch: str, config_name: str) -> None:
    ours, theirs = _pair(arch, config_name)

    assert _adapted_names(ours) == _adapted_names(theirs, "base_model.model.")
    trainable, total = theirs.get_nb_trainable_parameters()
    counts = lorakit.count_parameters(ours)
    assert (counts.trainable, counts.total) == (trainable, total)

    ids = tiny_models.input_ids()
    expected, actual, base = (
        _outputs(m, ids) for m in (theirs, ours, tiny_models.BUILDERS[arch]())
    )
    # BERT's tiny classification head hides small changes: look at the last hidden state too.
    assert (actual[1] - base[1]).abs().max() > 1e-3, "adapters must change the output here"
    assert (actual[0] - expected[0]).abs().max() <= 1e-5
    hidden_scale = max(1.0, expected[1].abs().max().item())
    assert (actual[1] - expected[1]).abs().max() <= 1e-5 * hidden_scale


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def test_print_trainable_parameters_matches_peft_line(capsys) -> None:
    config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**config))
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    lorakit.print_trainable_parameters(ours)
    assert capsys.readouterr().out == expected


def test_layer_count_is_by_type_not_by_name() -> None:
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    assert len(list(lora_layers(model))) == 2


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_a_seed_gives_peft_initial_factors_embeddings_included(init) -> None:
    """The same seed, the same A and B as PEFT for every layer, an embedding first in the
    model (PEFT draws its factors twice: the layers after it saw another random stream)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    fields["init_lora_weights"] = init
    torch.manual_seed(3)
    ours = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**fields))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**fields))
    theirs_state = theirs.state_dict()
    factors = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert len(factors) == 2 + 2 * 2  # embedding A, B; q_proj A, B in each of two blocks
    for key, value in factors.items():
        assert torch.equal(value, theirs_state["base_model.model." + key]), key
