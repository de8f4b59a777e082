"""Combining review, session 36: the served mixtures' and the command line's answers.

- A refusal of an adapter (or a mixture) saved on other base weights names no local path of
  the server (the model's directory, or one an adapter records as its base), plain request and
  mixture alike; ``load_adapter``'s message still names them.
- A mixture entry that ``combine`` refuses (density 0 or 1.5, rank 0, an unknown sign rule, a
  missing density) is a 400 whose ``param`` is that entry; ``null`` weights or merge_strategy
  mean "not given": the default, checked against peft running both adapters at once.
- A mixture of adapters with a LoRA on an embedding layer is refused before combining, naming
  the input adapter, not the mixture's internal name.
- ``lorakit combine --rank`` with cat names the flag.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser, main
from lorakit.commands.serve import build
from lorakit.errors import BaseModelMismatchError
from lorakit.io import base_verdicts, read_adapter
from lorakit.serve.mixtures import parse_mixture
from lorakit.serve.protocol import APIError
from tests import tiny_models, tiny_tokenizer
from tests.serving import assert_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = "tiny-base"
PROMPT = "the quick brown fox"
COUNT = 5
GOOD = {  # adapters saved on the served base: name -> LoraConfig fields
    "ad0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "ad1": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "o_proj"]),
    "emb_a": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "emb_b": dict(r=2, lora_alpha=2, target_modules=["embed_tokens", "v_proj"]),
}
FOREIGN = {  # saved on another base model, loaded from its own directory
    "foreign1": dict(r=2, lora_alpha=4, target_modules=["v_proj"]),
    "foreign2": dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
}


def _save(model, name: str, fields: dict, root, seed: int) -> None:
    lorakit.inject(model, lorakit.LoraConfig(**fields), adapter_name=name)
    tiny_models.randomize_adapters(model, seed=seed, std=0.3)
    lorakit.save_adapter(model, root / "adapters", name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(client, app, root, tokenizer)``: an in-process server over a tiny Llama loaded from
    ``root/model``, the adapters of ``GOOD`` (saved from a model loaded from that directory,
    so they record it as their base) and of ``FOREIGN`` (from ``root/other``)."""
    root = tmp_path_factory.mktemp("combine36")
    tokenizer = tiny_tokenizer.build()
    tiny_models.save_llama_with_tokenizer(root / "model", tokenizer)
    tiny_models.save_llama_with_tokenizer(root / "other", tokenizer, seed=7)
    for seed, (name, fields) in enumerate({**GOOD, **FOREIGN}.items()):
        directory = root / ("model" if name in GOOD else "other")
        _save(LlamaForCausalLM.from_pretrained(directory).eval(), name, fields, root, seed)
    options = ["--model", str(root / "model"), "--adapters", str(root / "adapters")]
    options += ["--max-adapters", "4", "--max-rank", "8", "--served-model-name", BASE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = build(build_parser().parse_args(["serve", *options]))
    with TestClient(app) as client:
        yield client, app, root, tokenizer


def _post(client, model: str, mixture: object = None, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": COUNT, "temperature": 0, **extra}
    if mixture is not None:
        body["merged_adapters"] = mixture
    return client.post("/v1/completions", json=body)


# ----------------------------------------------------------------------------- server paths
@pytest.mark.parametrize(
    ("model", "mixture", "param", "label"),
    [
        ("foreign1", None, "model", "adapter 'foreign1'"),
        (BASE, {"ids": ["foreign1"]}, "merged_adapters", "mixture of 'foreign1'"),
        (BASE, {"ids": ["foreign1", "foreign2"]}, "merged_adapters", "'foreign1', 'foreign2'"),
    ],
)
def test_other_base_refusals_show_no_server_path(served, model, mixture, param, label):
    client, _, root, _ = served
    response = _post(client, model, mixture)
    error = assert_error(response, 400, param, label, "was trained on different base weights")
    assert "does not match the fingerprint saved with the adapter" in error["message"]
    assert str(root) not in response.text  # neither root/model nor root/other
    assert "/tmp" not in response.text and "This model is" not in response.text


def test_the_same_local_directory_is_said_without_its_path(served):
    """An adapter that records the very directory the model was loaded from (another revision
    of it): the server's message says so without the path; ``load_adapter``'s keeps both."""
    _, _, root, _ = served
    model = LlamaForCausalLM.from_pretrained(root / "model").eval()
    stored = read_adapter(root / "adapters" / "foreign1").fingerprint
    names, local = sorted(stored), str(root / "model")
    refuse = base_verdicts.refuse_other_base
    served_text = refuse(
        model,
        stored,
        "'x'",
        names,
        allow_mismatch=True,
        remedy="-",
        trained_on=local,
        local_paths=False,
    )
    assert served_text.endswith(
        "The adapter was saved for the directory this model was loaded from (another "
        "revision, fine-tune or local change of it?)."
    )
    assert str(root) not in served_text
    with pytest.raises(BaseModelMismatchError) as loading:  # (the default: the names shown)
        refuse(model, stored, "'x'", names, allow_mismatch=False, remedy="-", trained_on=local)
    assert f"saved for base model {local!r}; this model is {local!r}" in str(loading.value)
    hub = refuse(
        model,
        stored,
        "'x'",
        names,
        allow_mismatch=True,
        remedy="-",
        trained_on="org/base",
        local_paths=False,
    )
    assert hub.endswith("The adapter was saved for base model 'org/base'.")  # a name, kept


# ------------------------------------------------------------------------- mixture entries
@pytest.mark.parametrize(
    ("entries", "param", "words"),
    [
        ({"merge_strategy": "ties", "density": 0}, "density", ["(0, 1]", "got 0.0"]),
        ({"merge_strategy": "ties", "density": 1.5}, "density", ["(0, 1]", "got 1.5"]),
        ({"merge_strategy": "svd", "rank": 0}, "rank", ["rank=0 must be a positive integer"]),
        (
            {"merge_strategy": "ties", "density": 0.5, "majority_sign_method": "x"},
            "majority_sign_method",
            ["('total', 'frequency')", "got 'x'"],
        ),
        ({"merge_strategy": True}, "merge_strategy", ["true is unknown"]),
    ],
)
def test_a_refused_entry_is_named_as_the_param(entries, param, words):
    """The entries ``combine`` refuses, as ``combine`` refuses them (a density left out:
    ``test_serve_mixtures``, on ``merged_adapters``, worded without Python's None)."""
    with pytest.raises(APIError) as refused:
        parse_mixture({"ids": ["ad0", "ad1"], **entries})
    assert refused.value.status == 400
    assert refused.value.param == f"merged_adapters.{param}"
    for word in words:
        assert word in refused.value.message
    assert "None" not in refused.value.message and "True" not in refused.value.message


def test_a_bad_density_is_a_400_on_the_entry_before_combining(served):
    client, app, _, _ = served
    before = app.state.mixtures.combined
    mixture = {"ids": ["ad0", "ad1"], "merge_strategy": "ties", "density": 1.5}
    assert_error(_post(client, BASE, mixture), 400, "merged_adapters.density", "got 1.5")
    mixture = {"ids": ["ad0", "ad1"], "merge_strategy": "dare_ties", "density": None}
    error = assert_error(_post(client, BASE, mixture), 400, "merged_adapters", "none was given")
    assert "None" not in error["message"]
    assert app.state.mixtures.combined == before


def test_null_weights_and_strategy_are_the_defaults_as_peft_computes_them(served):
    """``"weights": null, "merge_strategy": null``: 1 each by cat, the exact sum of both
    updates, so the served log-probabilities are peft's with both adapters active."""
    import peft

    client, _, root, tokenizer = served
    mixture = {"ids": ["ad0", "ad1"], "weights": None, "merge_strategy": None}
    response = _post(client, BASE, mixture, logprobs=1)
    assert response.status_code == 200, response.text
    got = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert parse_mixture(mixture) == parse_mixture({"ids": ["ad0", "ad1"], "weights": [1, 1]})
    base = LlamaForCausalLM.from_pretrained(root / "model").eval()
    reference = peft.PeftModel.from_pretrained(base, root / "adapters" / "ad0", "ad0")
    reference.load_adapter(root / "adapters" / "ad1", "ad1")
    reference.base_model.set_adapter(["ad0", "ad1"])  # both at once: Σ ΔWᵢ
    prompt_ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor([prompt_ids]), max_new_tokens=COUNT, do_sample=False
        )
        logits = reference(input_ids=out).logits[0].double()
    rows = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    expected = [float(row[t]) for row, t in zip(rows, out[0, len(prompt_ids) :], strict=True)]
    assert len(got) == COUNT
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
    plain = _post(client, BASE, logprobs=1).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(got, plain, strict=True)) > 1e-2  # (not the base)


# ------------------------------------------------------------------------------ embeddings
def test_a_mixture_with_an_embedding_lora_names_its_input_before_combining(served):
    client, app, _, _ = served
    before = app.state.mixtures.combined
    response = _post(client, BASE, {"ids": ["ad0", "emb_a", "emb_b"]})
    error = assert_error(response, 400, "merged_adapters.ids", "adapter 'emb_a'", "embed_tokens")
    assert "mixture:" not in error["message"] and "lorakit merge" in error["message"]
    assert app.state.mixtures.combined == before  # refused from the headers: nothing combined


# ------------------------------------------------------------------------------------ CLI
def test_cli_rank_with_cat_names_the_flag(served, tmp_path, capsys):
    _, _, root, _ = served
    adapters = [str(root / "adapters" / name) for name in ("ad0", "ad1")]
    output = tmp_path / "never"
    code = main(["combine", *adapters, "--rank", "4", "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "combine: --rank is for the methods that cut the result to a rank" in error
    assert "rank=4" not in error and not output.exists()
    with pytest.raises(lorakit.UserError, match=r"^combine: rank=4 is for the methods"):
        lorakit.combine(adapters, rank=4)  # (Python's name in Python)
