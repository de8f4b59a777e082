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

from tests.test_serve_robustness import AUTH, Served, assert_error, completion, files  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def served_copy(files, tmp_path, name: str, edit=None) -> Served:  # noqa: F811
    """A server over a copy of the adapters plus ``name``, a copy of ad0 changed by
    ``edit(directory)``."""
    root, tokenizer = files
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


def test_health_answers_while_the_bank_lock_is_held(files):  # noqa: F811
    served = Served(*files)
    with served.client:
        with served.bank.lock:  # e.g. a load or an unload in progress on another thread
            finished, response = in_thread(served.client.get, "/health")
        assert finished, "/health blocked on the bank's lock"
        assert response.status_code == 200 and response.json()["adapters_loaded"] == 0


def test_a_runtime_load_resolves_patterns_outside_the_bank_lock(files, monkeypatch):  # noqa: F811
    served = Served(*files)
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
    files,  # noqa: F811
    tmp_path,
    changes,
):
    served = served_copy(files, tmp_path, "evil", lambda d: edit_config(d, **changes))
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
