"""Fixes from a review of the serving registry (``serve/registry.py``, ``serve/mixtures.py``)
and of the base-fingerprint warnings (``io/base_verdicts.unverified_note``):

- an adapter whose fingerprint is missing or covers only some of its modules is reported with
  ``load_adapter``'s words by the server (once per read), by mixtures (naming the input) and by
  ``--resume`` (a warning);
- start-up skips adapter directories with invalid names (also with ``..``) in ``skipped``, with
  the way out; ``check_name`` says ``without '..'``;
- an adapter whose directory was deleted leaves the registry and gets OpenAI's 404; messages for
  HTTP clients show no server paths;
- files replaced by a copy of the same size with the old mtime are read again.

Server: the tiny Llama and adapters ad0..ad3 of ``tests/serving.py`` (2 slots, max rank 4).
Served values are compared with a fresh ``lorakit.load_adapter`` on a plain model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.io import save_adapter
from lorakit.io.fingerprint import METADATA_KEY
from lorakit.serve.mixtures import parse_mixture
from lorakit.serve.registry import AdapterRegistry, file_identity
from lorakit.train.resume import check_resume_base
from tests import tiny_models
from tests.serving import (
    AUTH,
    BASE,
    REGISTRY_PROMPT,
    Served,
    assert_error,
    base_model,
    fresh_logprobs,
    served_logprobs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = "adapter_model.safetensors"
PROMPT = REGISTRY_PROMPT  # (served_logprobs and fresh_logprobs use it)
VERIFY = "cannot verify"  # in every coverage warning


@pytest.fixture
def root(adapter_files, tmp_path) -> Path:
    """A copy of the adapters ad0..ad3 under ``tmp_path/adapters``."""
    source, _ = adapter_files
    shutil.copytree(source / "adapters", tmp_path / "adapters")
    return tmp_path


def _edit_fingerprint(directory: Path, keep: list[str] | None) -> None:
    """Rewrite the adapter file with a fingerprint of only ``keep``'s modules (None: none)."""
    path = directory / WEIGHTS
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    if keep is None:
        del metadata[METADATA_KEY]
    else:
        stored = json.loads(metadata[METADATA_KEY])
        stored["modules"] = {k: v for k, v in stored["modules"].items() if k in keep}
        metadata[METADATA_KEY] = json.dumps(stored)
    save_file(tensors, str(path), metadata=metadata)


def _copy_of(root: Path, source: str, name: str, keep: list[str] | None = ()) -> Path:
    """``adapters/name``: a copy of ``adapters/source``, fingerprint kept for ``keep`` only
    (the default: every module)."""
    directory = root / "adapters" / name
    shutil.copytree(root / "adapters" / source, directory)
    if keep != ():
        _edit_fingerprint(directory, keep)
    return directory


def _load_warnings(directory: Path, tokenizer) -> list[str]:
    """The coverage warnings of ``lorakit.load_adapter`` on a plain base model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(base_model(tokenizer), directory)
    return [str(w.message) for w in caught if VERIFY in str(w.message)]


def _after_label(message: str, label: str) -> str:
    prefix = f"adapter {label} "
    assert message.startswith(prefix), message
    return message[len(prefix) :]


def _logged(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and VERIFY in r.message]


def _assert_close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected) and len(got) > 0
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4, (got, expected)


# 1. fingerprint coverage, on every path


def test_served_adapter_whose_fingerprint_covers_no_module_is_logged_once(
    root, adapter_files, caplog
) -> None:
    _, tokenizer = adapter_files
    nocover = _copy_of(root, "ad0", "nocover", keep=[])
    served = Served(root, tokenizer)
    with served.client, caplog.at_level("WARNING", logger="lorakit.serve.registry"):
        first = served_logprobs(served, "nocover")
        assert served_logprobs(served, "nocover") == first  # resident: not read again
    logged = _logged(caplog, "lorakit.serve.registry")
    assert len(logged) == 1, logged
    assert (
        "adapter 'nocover' has a base-model fingerprint that does not cover 4 of its "
        in (logged[0])
    )
    (loading,) = _load_warnings(nocover, tokenizer)  # the same words as load_adapter's
    assert _after_label(logged[0], "'nocover'") == _after_label(loading, str(nocover))
    _assert_close(first, fresh_logprobs(nocover, tokenizer))


def test_served_peft_adapter_without_fingerprint_is_logged_as_load_adapter_warns(
    root, adapter_files, caplog
) -> None:
    import peft

    _, tokenizer = adapter_files
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    directory = root / "adapters" / "peftad"
    peft.get_peft_model(base_model(tokenizer), config).save_pretrained(directory)
    served = Served(root, tokenizer)
    with served.client, caplog.at_level("WARNING", logger="lorakit.serve.registry"):
        got = served_logprobs(served, "peftad")
    logged = _logged(caplog, "lorakit.serve.registry")
    assert logged == [
        "adapter 'peftad' has no base-model fingerprint (written by peft or another tool): "
        "lorakit cannot verify it was trained on this base model."
    ]
    (loading,) = _load_warnings(directory, tokenizer)
    assert _after_label(logged[0], "'peftad'") == _after_label(loading, str(directory))
    _assert_close(got, fresh_logprobs(directory, tokenizer))


def test_mixture_input_with_a_partial_fingerprint_is_logged_naming_it(
    root, adapter_files, caplog
) -> None:
    _, tokenizer = adapter_files
    _copy_of(root, "ad1", "partial", keep=["model.layers.0.self_attn.q_proj"])
    served = Served(root, tokenizer)
    mixture = {"ids": ["ad0", "partial"], "merge_strategy": "cat"}
    with served.client, caplog.at_level("WARNING", logger="lorakit.serve.mixtures"):
        got = served_logprobs(served, BASE, merged_adapters=mixture)
    logged = _logged(caplog, "lorakit.serve.mixtures")
    assert len(logged) == 1, logged  # ad0's fingerprint covers all its modules
    assert logged[0].startswith(
        "adapter 'partial' (in the mixture of 'ad0', 'partial') has a base-model fingerprint "
        "that does not cover 3 of its modules (model.layers.0.self_attn.v_proj, "
    )
    # the mixture served is ad0 + ad1's weights (cat: the exact sum of the updates)
    combined = lorakit.combine([root / "adapters" / "ad0", root / "adapters" / "ad1"], [1.0, 1.0])
    combined.save(root / "sum")
    _assert_close(got, fresh_logprobs(root / "sum", tokenizer))


@pytest.mark.parametrize("keep", [[], None], ids=["covers-none", "no-fingerprint"])
def test_resume_warns_as_load_adapter_when_the_fingerprint_does_not_cover(tmp_path, keep) -> None:
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    trained = tiny_models.llama(seed=0)
    lorakit.inject(trained, config)
    adapter = save_adapter(trained, tmp_path / "checkpoint" / "adapter")
    _edit_fingerprint(adapter, keep)
    model = tiny_models.llama(seed=0)
    lorakit.inject(model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_resume_base(model, tmp_path / "checkpoint", "default")
    messages = [str(w.message) for w in caught if VERIFY in str(w.message)]
    assert len(messages) == 1, messages
    expected = "does not cover 4 of its modules" if keep == [] else "has no base-model fingerprint"
    assert expected in messages[0] and str(adapter) in messages[0]
    plain = tiny_models.llama(seed=0)
    with warnings.catch_warnings(record=True) as loading:
        warnings.simplefilter("always")
        lorakit.load_adapter(plain, adapter)
    assert [str(w.message) for w in loading if VERIFY in str(w.message)] == messages


# 2. adapter names at start-up and at runtime

BAD_NAMES = ["my adapter", "_private", "v1..2", "x" * 129]


def test_startup_skips_adapter_directories_with_invalid_names_saying_why(
    root, adapter_files, caplog
) -> None:
    _, tokenizer = adapter_files
    for name in BAD_NAMES:
        _copy_of(root, "ad0", name)
    (root / "adapters" / "my notes").mkdir()  # not an adapter: not reported
    with caplog.at_level("WARNING", logger="lorakit.serve.adapter_dirs"):
        registry = AdapterRegistry(root / "adapters")
    assert registry.names() == ["ad0", "ad1", "ad2", "ad3"]
    assert sorted(registry.skipped) == sorted(BAD_NAMES)
    for name, reason in registry.skipped.items():
        assert "is not a valid adapter name" in reason and "without '..'" in reason
        assert (
            "rename the directory, or load it with /v1/load_lora_adapter lora_name=<valid name>"
        ) in reason
        assert any(name[:100] in message for message in caplog.messages)
    served = Served(root, tokenizer)
    with served.client:
        assert "v1..2" not in served.model_ids()
        response = served.post(
            "/v1/load_lora_adapter", {"lora_name": "my-adapter", "lora_path": "my adapter"}, AUTH
        )
        assert response.status_code == 200, response.text
        _assert_close(
            served_logprobs(served, "my-adapter"),
            fresh_logprobs(root / "adapters" / "ad0", tokenizer),
        )


def test_a_runtime_name_with_dot_dot_is_refused_saying_so(root, adapter_files) -> None:
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    with served.client:
        response = served.post(
            "/v1/load_lora_adapter", {"lora_name": "v1..2", "lora_path": "ad0"}, AUTH
        )
    assert_error(response, 400, "lora_name", "'v1..2' is invalid", "without '..'")


# 3. deleted directories, and no server paths in answers


def test_an_adapter_whose_directory_was_deleted_leaves_the_registry_with_a_404(
    root, adapter_files
) -> None:
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    with served.client:
        served_logprobs(served, "ad0")  # resident
        assert "ad0" in served.bank
        shutil.rmtree(root / "adapters" / "ad0")
        shutil.rmtree(root / "adapters" / "ad1")  # never loaded
        for name in ("ad0", "ad1"):
            response = served.post(
                "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2}
            )
            error = assert_error(response, 404, "model", f"the model {name!r} does not exist")
            assert error["code"] == "model_not_found"
            assert str(root) not in response.text
        assert served.model_ids() == [BASE, "ad2", "ad3"]
        assert "ad0" not in served.bank and "ad0" not in served.adapters.registry
        # the name is free again: a runtime load of new files under it serves them
        shutil.copytree(root / "adapters" / "ad2", root / "adapters" / "ad0")
        response = served.post("/v1/load_lora_adapter", {"lora_name": "ad0"}, AUTH)
        assert response.status_code == 200, response.text
        _assert_close(
            served_logprobs(served, "ad0"), fresh_logprobs(root / "adapters" / "ad2", tokenizer)
        )


def test_a_mixture_of_a_deleted_adapter_is_refused_and_the_adapter_unregistered(
    root, adapter_files
) -> None:
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    shutil.rmtree(root / "adapters" / "ad0")
    with served.client:
        response = served.post(
            "/v1/completions",
            {"model": BASE, "prompt": PROMPT, "max_tokens": 2, "merged_adapters": {"ids": ["ad0"]}},
        )
        assert_error(response, 400, "merged_adapters.ids", "the adapter 'ad0' is not served")
        assert "ad0" not in served.model_ids()


def _other_base_adapter(root: Path, tokenizer) -> Path:
    """``adapters/other``: an adapter saved on another base of the same shapes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    config = tiny_models.llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    other = LlamaForCausalLM(config).eval()
    lora = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lorakit.inject(other, lora, adapter_name="other")
    tiny_models.randomize_adapters(other, std=0.3)
    return save_adapter(other, root / "adapters", "other")


def test_errors_for_http_clients_name_the_adapter_not_the_server_path(root, adapter_files) -> None:
    _, tokenizer = adapter_files
    _other_base_adapter(root, tokenizer)
    served = Served(root, tokenizer)
    found = "adapter 'other' was trained on different base weights: module "
    with served.client:
        response = served.post("/v1/completions", {"model": "other", "prompt": PROMPT})
        assert_error(response, 400, "model", found, "--allow-base-mismatch")
        answers = [response.text]
        response = served.post(
            "/v1/load_lora_adapter", {"lora_name": "other2", "lora_path": "other"}, AUTH
        )
        assert_error(response, 400, "lora_path", "adapter 'other2' was trained on different")
        answers.append(response.text)
        mixture = {"ids": ["ad0", "other"]}
        response = served.post(
            "/v1/completions", {"model": BASE, "prompt": PROMPT, "merged_adapters": mixture}
        )
        assert_error(response, 400, "merged_adapters", "cannot be combined")
        answers.append(response.text)
    for text in answers:
        assert str(root) not in text and str(root.resolve()) not in text, text


def test_relative_writes_paths_inside_the_root_relative_to_it(tmp_path) -> None:
    (tmp_path / "adapters").mkdir()
    registry = AdapterRegistry(tmp_path / "adapters")
    inside = registry.root / "ad0" / WEIGHTS
    assert registry.relative(f"adapter {inside} is broken") == f"adapter ad0/{WEIGHTS} is broken"
    assert registry.relative(f"in {registry.root}") == "in ."


# 4. files replaced by a copy of the same size that keeps the old mtime


def _replace_keeping_size_and_mtime(target: Path, source: Path) -> None:
    """``cp -p`` of the adapter files of ``source`` over those of ``target`` (same sizes)."""
    time.sleep(0.02)  # past the file system's coarse clock tick: ctime moves
    for name in ("adapter_config.json", WEIGHTS):
        old, new = target / name, source / name
        stat = old.stat()
        assert stat.st_size == new.stat().st_size  # (the case the stamps used to miss)
        shutil.copyfile(new, old)
        os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_file_identity_changes_when_files_are_replaced_keeping_size_and_mtime(root) -> None:
    target = root / "adapters" / "ad0"
    before = file_identity(target)
    _replace_keeping_size_and_mtime(target, root / "adapters" / "ad1")
    assert file_identity(target) != before
    renamed = file_identity(target)
    shutil.copy2(target / WEIGHTS, root / "staged")  # rsync -a: a new file renamed over it
    os.replace(root / "staged", target / WEIGHTS)
    assert file_identity(target) != renamed


def test_a_served_adapter_replaced_keeping_size_and_mtime_is_read_again(
    root, adapter_files
) -> None:
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    target, replacement = root / "adapters" / "ad0", root / "adapters" / "ad1"
    mixture = parse_mixture({"ids": ["ad0", "ad2"]})
    with served.client:
        old = served_logprobs(served, "ad0")
        old_mixture = served.app.state.mixtures.name_of(mixture)
        _replace_keeping_size_and_mtime(target, replacement)
        new = served_logprobs(served, "ad0")
        assert served.app.state.mixtures.name_of(mixture) != old_mixture
    _assert_close(new, fresh_logprobs(replacement, tokenizer))
    assert max(abs(a - b) for a, b in zip(old, new, strict=True)) > 1e-3


def test_an_adapter_redeployed_by_delete_and_copy_is_served_again(root, adapter_files) -> None:
    """rm -rf ad0 && cp -r new ad0: requests in the gap get a 404 that says why; once the
    directory is back the next request serves the new files (and a directory added after
    start-up is served too)."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    with served.client:
        served_logprobs(served, "ad0")
        shutil.rmtree(root / "adapters" / "ad0")
        response = served.post("/v1/completions", {"model": "ad0", "prompt": PROMPT})
        assert_error(response, 404, "model", "its directory was deleted")
        shutil.copytree(root / "adapters" / "ad2", root / "adapters" / "ad0")
        _assert_close(
            served_logprobs(served, "ad0"), fresh_logprobs(root / "adapters" / "ad2", tokenizer)
        )
        shutil.copytree(root / "adapters" / "ad3", root / "adapters" / "late")
        _assert_close(
            served_logprobs(served, "late"), fresh_logprobs(root / "adapters" / "ad3", tokenizer)
        )
        assert {"ad0", "late"} <= set(served.model_ids())


def test_a_symlink_inside_the_adapter_directory_is_followed_when_re_pointed(
    root, adapter_files
) -> None:
    """prod -> releases/v1, then ln -sfn releases/v2 prod: the next request serves v2, and
    deleting v1 afterwards leaves prod served."""
    _, tokenizer = adapter_files
    releases = root / "adapters" / "releases"
    shutil.copytree(root / "adapters" / "ad1", releases / "v1")
    shutil.copytree(root / "adapters" / "ad2", releases / "v2")
    (root / "adapters" / "prod").symlink_to(Path("releases") / "v1", target_is_directory=True)
    served = Served(root, tokenizer)
    with served.client:
        _assert_close(served_logprobs(served, "prod"), fresh_logprobs(releases / "v1", tokenizer))
        staged = root / "adapters" / "prod.new"
        staged.symlink_to(Path("releases") / "v2", target_is_directory=True)
        staged.replace(root / "adapters" / "prod")  # as ln -sfn does it, atomically
        _assert_close(served_logprobs(served, "prod"), fresh_logprobs(releases / "v2", tokenizer))
        shutil.rmtree(releases / "v1")
        _assert_close(served_logprobs(served, "prod"), fresh_logprobs(releases / "v2", tokenizer))


def test_an_unloaded_adapter_is_not_found_again_from_its_directory(root, adapter_files) -> None:
    """/v1/unload_lora_adapter withdraws it: requests are 404 though its directory is there,
    until a runtime load brings it back."""
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    with served.client:
        served_logprobs(served, "ad1")
        response = served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH)
        assert response.status_code == 200, response.text
        for _ in range(2):
            response = served.post("/v1/completions", {"model": "ad1", "prompt": PROMPT})
            assert_error(response, 404, "model", "does not exist")
        assert "ad1" not in served.model_ids()
        response = served.post("/v1/load_lora_adapter", {"lora_name": "ad1"}, AUTH)
        assert response.status_code == 200, response.text
        _assert_close(
            served_logprobs(served, "ad1"), fresh_logprobs(root / "adapters" / "ad1", tokenizer)
        )


def test_a_name_loaded_from_another_directory_never_falls_back_to_root_name(
    root, adapter_files
) -> None:
    """ad1 unloaded, loaded again from lora_path v2, v2 deleted: ad1 stays gone (a 404 saying
    to load it again), never served from adapters/ad1 unasked; restoring v2 does not bring it
    back by itself either."""
    _, tokenizer = adapter_files
    shutil.copytree(root / "adapters" / "ad2", root / "adapters" / "v2")
    served = Served(root, tokenizer)
    with served.client:
        assert served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH).status_code == 200
        body = {"lora_name": "ad1", "lora_path": "v2"}
        assert served.post("/v1/load_lora_adapter", body, AUTH).status_code == 200
        served_logprobs(served, "ad1")
        shutil.move(root / "adapters" / "v2", root / "v2-away")
        errors = []
        for _ in range(2):
            response = served.post("/v1/completions", {"model": "ad1", "prompt": PROMPT})
            errors.append(assert_error(response, 404, "model", "does not exist")["message"])
        assert "load it again with /v1/load_lora_adapter" in errors[0]  # (then: unknown)
        shutil.move(root / "v2-away", root / "adapters" / "v2")
        response = served.post("/v1/completions", {"model": "ad1", "prompt": PROMPT})
        assert_error(response, 404, "model", "does not exist")
        assert "ad1" not in served.model_ids()


def test_a_broken_adapter_directory_is_a_400_naming_it_not_discovered(root, adapter_files) -> None:
    _, tokenizer = adapter_files
    served = Served(root, tokenizer)
    broken = root / "adapters" / "broken"
    shutil.copytree(root / "adapters" / "ad0", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    with served.client:
        response = served.post("/v1/completions", {"model": "broken", "prompt": PROMPT})
        assert_error(response, 400, "model", "'broken'", "cannot be served")
        assert "broken" not in served.model_ids()


def test_the_public_merge_takes_no_dtype() -> None:
    import inspect

    assert list(inspect.signature(lorakit.merge).parameters) == ["model", "adapter_names"]
