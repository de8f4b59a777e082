"""Adapter files are untrusted input to a server: a bad one is a 400 naming what is wrong (never
a 500, a 404 or a hang), /health answers while adapters load, start-up skips broken adapters and
reads headers only, and nothing outside the adapter directory is served through a symlink.

Uses the app and adapters of ``test_serve_robustness`` (tiny Llama, four adapters ad0..ad3).
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from fastapi.testclient import TestClient

from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.io import read as read_module
from lorakit.io import tensors as tensors_module
from tests import tiny_models
from tests.bad_adapters import CASES, write_header_only_file
from tests.serving import AUTH, Served, assert_error, completion

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def served_copy(adapter_files, tmp_path, name: str, edit=None) -> Served:
    """A server over a copy of the adapters plus ``name``, a copy of ad0 changed by
    ``edit(directory)``."""
    root, tokenizer = adapter_files
    shutil.copytree(root / "adapters", tmp_path / "adapters")
    shutil.copytree(root / "adapters" / "ad0", tmp_path / "adapters" / name)
    if edit is not None:
        edit(tmp_path / "adapters" / name)
    return Served(tmp_path, tokenizer)


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def in_thread(function, *args):
    """Run ``function`` on another thread; (finished, result) after at most 60 s (a deadlock
    guard: a hang fails the test instead of stalling the suite)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    return not thread.is_alive(), result[0] if result else None


def test_health_answers_while_the_bank_lock_is_held(adapter_files):
    served = Served(*adapter_files)
    with served.client:
        with served.bank.lock:  # e.g. a load or an unload in progress on another thread
            finished, response = in_thread(served.client.get, "/health")
        assert finished, "/health blocked on the bank's lock"
        assert response.status_code == 200 and response.json()["adapters_loaded"] == 0


def test_a_runtime_load_resolves_patterns_outside_the_bank_lock(adapter_files, monkeypatch):
    served = Served(*adapter_files)
    config_type = type(served.adapters.read("ad1")[0])
    alpha_for, held = config_type.alpha_for, []

    def free_elsewhere() -> bool:  # can another thread take the bank's lock now?
        if not served.bank.lock.acquire(blocking=False):
            return False
        served.bank.lock.release()
        return True

    def recording_alpha_for(config, name):
        held.append(not in_thread(free_elsewhere)[1])
        return alpha_for(config, name)

    monkeypatch.setattr(config_type, "alpha_for", recording_alpha_for)
    with served.client:
        response = served.post(
            "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "ad1"}, AUTH
        )
        assert response.status_code == 200, response.text
        assert served.post("/v1/completions", completion(model="ad2")).status_code == 200
    assert len(held) == 8 and not any(held)  # 4 layers x 2 loads, never under the lock


@pytest.mark.parametrize(
    "changes",
    [
        {"rank_pattern": {"(.*)*x": 4}},
        {"alpha_pattern": {"(a|aa)*b": 4}},
        {"target_modules": "(.*)*x"},
    ],
)
def test_a_pattern_that_could_backtrack_forever_is_a_400_and_health_answers(
    adapter_files,
    tmp_path,
    changes,
):
    served = served_copy(adapter_files, tmp_path, "evil", lambda d: edit_config(d, **changes))
    field = next(iter(changes))
    with served.client:
        body = {"lora_name": "evil2", "lora_path": "evil"}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        assert_error(response, 400, "lora_path", f"LoraConfig.{field}", "nested quantifiers")
        lazily = served.post("/v1/completions", completion(model="evil"))
        assert_error(lazily, 400, "model", "nested quantifiers")
        health = served.client.get("/health")
        assert health.status_code == 200 and health.json()["adapters_loaded"] == 0
        assert served.post("/v1/completions", completion()).status_code == 200


# ----------------------------------------------------------------- malformed files (issue 12.6)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_malformed_adapter_is_a_400_naming_the_problem(adapter_files, tmp_path, case):
    served = served_copy(adapter_files, tmp_path, "bad", case.edit)
    with served.client:
        response = served.post(
            "/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": "bad"}, AUTH
        )
        assert_error(response, 400, "lora_path", *case.words_for("server"))
        if "bad" in served.adapters.registry:  # registered at start: loaded on first use
            lazily = served.post("/v1/completions", completion(model="bad"))
            assert_error(lazily, 400, "model", *case.words_for("server"))
        assert served.bank.names() == [] and "b2" not in served.model_ids()
        assert served.post("/v1/completions", completion()).status_code == 200


@pytest.mark.parametrize(
    ("lora_path", "words"),
    [("x" * 5000, "File name too long"), ("loop", "cannot be resolved"), ("a\x00b", "null")],
    ids=["over-long", "symlink-loop", "nul-byte"],
)
def test_unusable_lora_paths_are_a_400(adapter_files, lora_path, words):
    served = Served(*adapter_files)
    loop = served.root / "adapters" / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    try:
        with served.client:
            body = {"lora_name": "x", "lora_path": lora_path}
            response = served.post("/v1/load_lora_adapter", body, AUTH)
            error = assert_error(response, 400, "lora_path", words)
            assert len(error["message"]) < 1000  # the path is shown shortened
    finally:
        loop.unlink()


# ----------------------------------------------------------------- symlinks out (issue 12.8)
def test_a_file_symlinked_out_of_the_adapter_directory_is_refused(adapter_files, tmp_path):
    root, _ = adapter_files
    outside = tmp_path / "outside"
    shutil.copytree(root / "adapters" / "ad1", outside)

    def link_weights_out(directory):
        (directory / "adapter_model.safetensors").unlink()
        (directory / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")

    served = served_copy(adapter_files, tmp_path, "leak", link_weights_out)
    assert "leak" not in served.adapters.registry  # present at start-up: skipped
    assert "leads outside the adapter directory" in served.adapters.registry.skipped["leak"]
    with served.client:
        body = {"lora_name": "leak2", "lora_path": "leak"}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        assert_error(response, 400, "lora_path", "leads outside the adapter directory", "symlink")
        # a registered adapter whose file is swapped for a link out afterwards: refused on read
        link_weights_out(served.root / "adapters" / "ad2")
        lazily = served.post("/v1/completions", completion(model="ad2"))
        assert_error(lazily, 400, "model", "leads outside the adapter directory")
        for answer in (response, lazily):  # where the link leads stays in the server's log
            assert str(outside) not in answer.text and str(tmp_path) not in answer.text
        assert served.bank.names() == [] and "leak2" not in served.model_ids()


def test_a_symlinked_directory_is_served_only_when_it_stays_inside(adapter_files, tmp_path):
    root, tokenizer = adapter_files
    shutil.copytree(root / "adapters", tmp_path / "adapters")
    shutil.copytree(root / "adapters" / "ad0", tmp_path / "outside")
    (tmp_path / "adapters" / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "adapters" / "alias").symlink_to("ad1", target_is_directory=True)  # inside
    served = Served(tmp_path, tokenizer)
    assert served.adapters.registry.names() == ["ad0", "ad1", "ad2", "ad3", "alias"]
    assert "leads outside the adapter directory" in served.adapters.registry.skipped["out"]
    with served.client:
        missing = served.post("/v1/completions", completion(model="out"))
        assert_error(missing, 400, "model", "leads outside the adapter directory")
        body = {"lora_name": "out2", "lora_path": "out"}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        assert_error(response, 400, "lora_path", "leads outside the adapter directory")
        assert served.post("/v1/completions", completion(model="alias")).status_code == 200


# ----------------------------------------------------------------- start-up scan (issue 12.7)
def test_start_up_skips_a_broken_adapter_and_reads_headers_only(
    adapter_files,
    tmp_path,
    monkeypatch,
    caplog,
):

    root, tokenizer = adapter_files
    tiny_models.save_llama_with_tokenizer(tmp_path / "model", tokenizer)
    shutil.copytree(root / "adapters" / "ad1", tmp_path / "adapters" / "good")
    shutil.copytree(root / "adapters" / "ad2", tmp_path / "adapters" / "broken")
    (tmp_path / "adapters" / "broken" / "adapter_model.safetensors").write_bytes(
        b"\x08" + b"\0" * 7
    )
    reads = []
    real = tensors_module.read_safetensors
    counting = lambda path: reads.append(path) or real(path)  # noqa: E731
    monkeypatch.setattr(tensors_module, "read_safetensors", counting)
    monkeypatch.setattr(read_module, "read_safetensors", counting)
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters")]
    )
    with caplog.at_level("INFO"):
        app = build(args)
    assert reads == []  # start-up read configs and headers only
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "'broken'" in warning and "not a valid safetensors file" in warning
    summary = next(r.getMessage() for r in caplog.records if "served" in r.getMessage())
    assert "1 served (good), 1 skipped" in summary and "skipped broken: " in summary
    with TestClient(app) as client:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert ids == ["model", "good"]
        response = client.post("/v1/completions", json=completion(model="good"))
        assert response.status_code == 200, response.text
    assert len(reads) == 1  # the good adapter, read on first use


def test_a_file_that_does_not_fit_is_refused_from_its_header(adapter_files, tmp_path, monkeypatch):
    """512 MiB of factors (a sparse file) of the wrong shape: a 400 before any data is read."""
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"

    def oversized(directory):
        (directory / "adapter_model.safetensors").unlink()
        write_header_only_file(
            directory / "adapter_model.safetensors",
            {f"{prefix}.lora_A.weight": (2**15, 2**12), f"{prefix}.lora_B.weight": (64, 2**15)},
            {"format": "pt"},
        )

    served = served_copy(adapter_files, tmp_path, "oversized", oversized)
    reads = []
    monkeypatch.setattr(read_module, "read_safetensors", lambda path: reads.append(path))
    with served.client:
        body = {"lora_name": "o2", "lora_path": "oversized"}
        response = served.post("/v1/load_lora_adapter", body, AUTH)
        assert_error(response, 400, "lora_path", "has lora_A (32768, 4096)", "expected")
    assert reads == []


def test_an_adapter_replaced_on_disk_is_read_again_at_its_next_request(adapter_files, tmp_path):
    """A retrained adapter copied over a served one: the next request reads the new files
    (the bank kept serving the old weights until an eviction switched silently)."""
    served = served_copy(adapter_files, tmp_path, "swap")
    greedy = dict(temperature=0, max_tokens=6)
    with served.client:
        texts = {
            name: served.post("/v1/completions", completion(model=name, **greedy)).json()
            for name in ("ad0", "ad1", "swap")
        }
        texts = {name: body["choices"][0]["text"] for name, body in texts.items()}
        assert texts["swap"] == texts["ad0"] != texts["ad1"]
        for file in (tmp_path / "adapters" / "ad1").iterdir():
            shutil.copy(file, tmp_path / "adapters" / "swap" / file.name)
        again = served.post("/v1/completions", completion(model="swap", **greedy)).json()
    assert again["choices"][0]["text"] == texts["ad1"]
