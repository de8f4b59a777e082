"""Review 39's small fixes.

1. ``lorakit serve``: a DoRA adapter whose ``n = ||W0 + s B A||_row`` is 0 on some rows of the
   served base (f = m / n undefined) is a 400 naming the adapter, the layer and the rows, on a
   request and on a runtime load (was: HTTP 500 on a request); the server keeps serving others.
2. ``lorakit export`` of an adapter whose base config says ``"dtype": "auto"`` (the key
   transformers 5 writes) exports it (the base's dtype never reaches the file); ``lorakit plan``'s
   refusal of it names that key and an option ``lorakit plan`` has.
3. ``typing.get_type_hints`` works on the public functions of combining/files.py and
   serve/checks.py, whose annotations named a class imported only under ``TYPE_CHECKING`` (no
   import cycle kept it there).
"""

from __future__ import annotations

import collections.abc
import copy
import json
import re
import typing

import peft
import pytest
import torch

from lorakit.cli import main
from tests import serving, tiny_models, tiny_tokenizer

LAYER = "model.layers.0.self_attn.q_proj"
ZERO_ROW = 3


# ---- 1. serving a DoRA adapter with zero row norms ----------------------------------------------
def _zero_norm_rows(layer, adapter: str) -> list[int]:
    """The rows where ``||W0 + s B A||_row == 0``, in float64 from peft's own tensors."""
    weight = layer.base_layer.weight.double()
    delta = layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
    norms = torch.linalg.vector_norm(weight + layer.scaling[adapter] * delta, dim=1)
    return (norms == 0).nonzero().flatten().tolist()


@pytest.fixture(scope="module")
def dora_server(tmp_path_factory):
    """``lorakit serve`` (uvicorn on loopback) over a base whose q_proj row 3 of layer 0 is zero,
    with peft's adapters "bad" (DoRA, B row 3 zero there: n = 0) and "good" (plain LoRA)."""
    import httpx
    import uvicorn

    from lorakit.commands import serve as serve_command

    tmp = tmp_path_factory.mktemp("dora_zero_rows")
    tokenizer = tiny_tokenizer.build()
    base = serving.base_model(tokenizer)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[ZERO_ROW].zero_()
    base.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    targets = ["q_proj", "v_proj"]
    oracle = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True),
        "bad",
    )
    oracle.add_adapter("good", peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    serving.randomize_peft_lora(oracle)
    layer = oracle.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["bad"].weight[ZERO_ROW].zero_()
    oracle.eval().save_pretrained(tmp / "adapters")
    (tmp / "token").write_text(serving.TOKEN)
    started: dict = {}

    def run_server(app, **kwargs) -> None:
        kwargs["log_level"] = "warning"
        started["server"] = uvicorn.Server(uvicorn.Config(app, **kwargs))
        started["server"].run()

    patch = pytest.MonkeyPatch()
    patch.setattr(serve_command, "_freeze_start_up_objects", lambda: None)
    patch.setattr(uvicorn, "run", run_server)
    port = serving.free_port()
    argv = ["serve", "--model", str(tmp / "model"), "--adapters", str(tmp / "adapters")]
    argv += ["--port", str(port), "--admin-token-file", str(tmp / "token")]
    results: dict = {}
    thread = serving.run_in_thread(lambda: main(argv), "serve", results)
    try:
        serving.wait_until(lambda: "server" in started and started["server"].started)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, oracle, _zero_norm_rows(layer, "bad")
    finally:
        if "server" in started:
            started["server"].should_exit = True
        thread.join(timeout=30)
        patch.undo()
    assert results["serve"] == 0


def _ask(client, model: str):
    body = {"model": model, "prompt": serving.PROMPT, "max_tokens": 4, "temperature": 0}
    return client.post("/v1/completions", json=body)


def _assert_names_adapter_layer_rows(answer, name: str, rows: list[int], param: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    message = error["message"]
    assert f"adapter {name!r}" in message and f"layer {LAYER!r}" in message
    assert f"row {', '.join(map(str, rows))}" in message and "DoRA" in message


def _assert_good_adapter_like_peft(client, oracle) -> None:
    answer = _ask(client, "good")
    assert answer.status_code == 200, answer.text
    expected = serving.peft_greedy(oracle, serving.PROMPT, "good", 4)
    assert answer.json()["choices"][0]["text"] == tiny_tokenizer.build().decode(expected)


def test_a_request_for_the_adapter_is_a_400_naming_adapter_layer_and_rows(dora_server):
    client, oracle, rows = dora_server
    assert rows == [ZERO_ROW]  # (the float64 oracle: the only row where n = 0)
    for _ in range(2):  # refused each time, and the server goes on serving the others
        _assert_names_adapter_layer_rows(_ask(client, "bad"), "bad", rows, "model")
        _assert_good_adapter_like_peft(client, oracle)


def test_a_runtime_load_of_the_adapter_is_a_400_naming_it(dora_server):
    client, oracle, rows = dora_server
    body = {"lora_name": "bad_again", "lora_path": "bad"}
    answer = client.post("/v1/load_lora_adapter", json=body, headers=serving.AUTH)
    _assert_names_adapter_layer_rows(answer, "bad_again", rows, "lora_path")
    assert _ask(client, "bad_again").status_code == 404  # nothing of it left behind
    _assert_good_adapter_like_peft(client, oracle)


# ---- 2. a base config whose dtype is "auto" -------------------------------------------------------
def _base_dir(path, dtype: str | None):
    """A tiny Llama saved by transformers (its config's key: ``dtype``), ``dtype`` written in."""
    tiny_models.llama().save_pretrained(path)
    config = path / "config.json"
    values = json.loads(config.read_text())
    assert "dtype" in values and "torch_dtype" not in values  # what transformers 5 writes
    if dtype is not None:
        config.write_text(json.dumps(values | {"dtype": dtype}))
    return str(path)


def test_export_of_an_adapter_on_an_auto_dtype_base_equals_the_float32_one(tmp_path):
    from tests.gguf_helpers import saved_adapter

    _, adapter = saved_adapter(tmp_path / "adapter", tiny_models.llama())
    outputs = {}
    for dtype in ("auto", None):
        base = _base_dir(tmp_path / f"base_{dtype}", dtype)
        outputs[dtype] = tmp_path / f"{dtype}.gguf"
        argv = ["export", str(adapter), "--format", "gguf", "--model", base]
        assert main([*argv, "--output", str(outputs[dtype])]) == 0
    assert outputs["auto"].read_bytes() == outputs[None].read_bytes()


def _options_of(command: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))


def test_plan_refusal_names_the_config_key_and_an_option_plan_has(tmp_path, capsys):
    base = _base_dir(tmp_path / "base", "auto")
    options = _options_of("plan", capsys)
    assert main(["plan", base, "--seq-len", "8"]) == 2
    error = capsys.readouterr().err
    assert "the model config's dtype (dtype) 'auto' is not supported" in error
    assert "torch_dtype" not in error
    named = set(re.findall(r"--[a-z][a-z-]*", error))
    assert named and named <= options, named - options
    assert main(["plan", base, "--dtype", "float32", "--seq-len", "8"]) == 0  # the way out


# ---- 3. typing.get_type_hints -----------------------------------------------------------------------
def test_type_hints_of_the_other_fixed_modules_resolve():
    from lorakit.combining import combined, files
    from lorakit.serve import checks, stacks

    for function in (files.adapter_config_text, files.add_to_model, files.write_adapter_files):
        assert combined.CombinedAdapter in typing.get_type_hints(function).values()
    for function in (checks.lora_pairs, checks.prepare_adapter):
        hints = typing.get_type_hints(function)
        assert hints["stacks"] == collections.abc.Mapping[str, stacks.LayerStack]
