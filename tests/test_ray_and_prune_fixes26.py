"""Fixes of review 26: the Ray Serve deployment (a bank with no slot beyond the pinned
multiplexed cache, a route prefix, a Namespace or an abbreviated ``--max-adapters`` given to
``build_app``, the ingress's own 404/405) and checkpoint pruning killed midway."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lorakit.cli import build_parser
from lorakit.commands.serve import build
from lorakit.train.checkpoint import (
    TENSOR_FILES,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lorakit.train.checkpoint_dirs import checkpoint_dirs, prune
from lorakit.train.optim import build_optimizer
from lorakit.train.schedule import build_scheduler
from tests.train_job import build_model

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed")
if HAS_RAY:  # the local cluster and the tiny model + adapters of tests/test_serve_ray.py
    from tests.test_serve_ray import ray_port, serve, serve_args, world  # noqa: F401

OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def replica_args(app) -> list[str]:
    """The ``lorakit serve`` arguments each replica of ``build_app``'s application gets."""
    replica = app._bound_deployment.init_args[0]  # (Ray's Application: the bound deployment)
    return replica._bound_deployment.init_args[0]


# --- Ray: build_app ---------------------------------------------------------------------------


@needs_ray
@pytest.mark.parametrize("max_adapters", [1, 2, 4])
def test_build_app_refuses_a_bank_the_pinned_adapters_fill(max_adapters):
    """The bank's slots all pinned by Ray's multiplexed cache (adapters_per_replica=4): the
    fifth adapter was answered 503 for ever; now build_app says what to set."""
    from lorakit.serve.ray_deployment import build_app

    args = ["--model", "m", "--adapters", "a", "--max-adapters", str(max_adapters)]
    with pytest.raises(ValueError) as error:
        build_app(args, adapters_per_replica=4)
    message = str(error.value)
    assert f"--max-adapters {max_adapters}" in message and "adapters_per_replica=4" in message
    assert "at least 5" in message and "\n" not in message


@needs_ray
@pytest.mark.parametrize(("option", "expected"), [(["--max-adapters", "5"], 5), ([], 4 + 2)])
def test_build_app_accepts_one_free_slot_and_defaults_to_two(option, expected):
    from lorakit.serve.ray_deployment import build_app

    app = build_app(["--model", "m", "--adapters", "a", *option], adapters_per_replica=4)
    assert build_parser().parse_args(["serve", *replica_args(app)]).max_adapters == expected


@needs_ray
@pytest.mark.parametrize("spelling", ["--max-adapt", "--max-ad", "--max-adapters"])
def test_an_abbreviated_max_adapters_is_kept(spelling):
    """argparse reads ``--max-adapt 40`` as ``--max-adapters 40``; build_app appended its own
    ``--max-adapters 18`` after it, which won."""
    from lorakit.serve.ray_deployment import build_app

    app = build_app(["--model", "m", "--adapters", "a", spelling, "40"], adapters_per_replica=16)
    assert build_parser().parse_args(["serve", *replica_args(app)]).max_adapters == 40


@needs_ray
@pytest.mark.parametrize(
    "serve_args", [argparse.Namespace(model="m", adapters="a"), "--model m --adapters a"]
)
def test_build_app_refuses_what_is_not_a_list_of_arguments_clearly(serve_args):
    """A Namespace crashed with "'Namespace' object is not iterable"; a string was split
    into characters."""
    from lorakit.serve.ray_deployment import build_app

    with pytest.raises(TypeError, match=r"list of strings.*not (Namespace|str)"):
        build_app(serve_args)


@needs_ray
def test_build_app_takes_a_tuple_and_the_keyword_form():
    from lorakit.serve.ray_deployment import build_app

    app = build_app(("--max-rank", "8"), model="m", adapters="a", adapters_per_replica=3)
    options = build_parser().parse_args(["serve", *replica_args(app)])
    assert (options.model, options.adapters, options.max_rank, options.max_adapters) == (
        "m",
        "a",
        8,
        5,
    )


# --- Ray: the ingress ---------------------------------------------------------------------------


@needs_ray
@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/lk/v1/completions", "/lk", "/v1/completions"),
        ("/lk/v1/models", "/lk/", "/v1/models"),
        ("/v1/models", "", "/v1/models"),
        ("/a/b/health", "/a/b", "/health"),
        ("/lk", "/lk", "/"),
        ("/lkx/v1/models", "/lk", "/lkx/v1/models"),  # another prefix that starts the same
    ],
)
def test_the_replica_gets_the_path_without_the_route_prefix(path, root_path, expected):
    from lorakit.serve.ray_deployment import _app_path

    assert _app_path({"path": path, "root_path": root_path}) == expected


@needs_ray
def test_the_ingress_answers_its_own_errors_as_openai_errors():
    """FastAPI's default ``{"detail": ...}`` was answered by the ingress, not the OpenAI error
    object every other error of lorakit's server is."""
    from lorakit.serve.ray_deployment import ingress_app

    client = TestClient(ingress_app)
    answer = client.get("/v1/completions")
    assert answer.status_code == 405
    assert set(answer.json()["error"]) == OPENAI_ERROR_FIELDS
    assert answer.json()["error"]["code"] == "405"
    assert answer.headers["allow"] == "POST"  # (the 405's headers kept)
    missing = client.post("/v1/load_lora_adapter", json={})  # not forwarded: the ingress's 404
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "Not Found",
        "type": "invalid_request_error",
        "param": None,
        "code": "404",
    }


def completions_of_one_server(root, names: list[str]) -> dict[str, str]:
    args = build_parser().parse_args(["serve", *serve_args(root)])
    with TestClient(build(args)) as client:
        answers = {name: client.post("/v1/completions", json=body(name)) for name in names}
    return {name: answer.json()["choices"][0]["text"] for name, answer in answers.items()}


def body(name: str) -> dict:
    return dict(model=name, prompt="hello world", max_tokens=4, temperature=0)


@needs_ray
@pytest.mark.slow
def test_a_route_prefix_and_more_adapters_than_the_cache_serve_like_one_server(world, ray_port):
    """Under ``route_prefix="/lk"`` every request was a 404 (the replica got ``/lk/v1/...``).
    A bank of ``adapters_per_replica + 1`` slots (the least build_app takes) serves five
    adapters in turn through a cache of two, twice, as one server answers them; the ingress's
    own 404 and 405 are OpenAI errors through Ray too."""
    from lorakit.serve.ray_deployment import build_app

    names = [f"ad{index:02d}" for index in range(5)]
    expected = completions_of_one_server(world, names)
    assert len(set(expected.values())) > 1  # the adapters differ
    args = [*serve_args(world), "--max-adapters", "3"]
    serve.run(
        build_app(args, replicas=1, adapters_per_replica=2), name="lorakit", route_prefix="/lk"
    )
    url = f"http://127.0.0.1:{ray_port}/lk"
    try:
        for name in names * 2:
            answer = httpx.post(f"{url}/v1/completions", json=body(name), timeout=120)
            assert answer.status_code == 200, (name, answer.text)
            assert answer.json()["choices"][0]["text"] == expected[name], name
        models = httpx.get(f"{url}/v1/models", timeout=60)
        assert models.status_code == 200 and "ad04" in {m["id"] for m in models.json()["data"]}
        for method, path, status in [("GET", "/v1/completions", 405), ("GET", "/v1/x", 404)]:
            answer = httpx.request(method, url + path, timeout=60)
            assert answer.status_code == status
            assert answer.json()["error"]["code"] == str(status), answer.text
    finally:
        serve.delete("lorakit")


# --- Checkpoint pruning killed midway ---------------------------------------------------------


class Killed(BaseException):
    """The process killed (nothing in lorakit catches it)."""


def save(output_dir, step: int, model, optimizer, scheduler):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.fill_(float(step))  # (B != 0: each checkpoint's weights differ)
    return save_checkpoint(
        output_dir, step, model, optimizer, scheduler, {"step_note": step}, keep=2
    )


def test_a_prune_killed_midway_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """``prune`` deleted an old checkpoint in place: killed midway, it left a ``step-*``
    holding ``trainer_state.json`` but not its tensors, still counted as a checkpoint."""
    model = build_model(0.0)
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=0)
    for step in (1, 2):
        save(tmp_path, step, model, optimizer, scheduler)
    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path, *args, **kwargs):
        if not (os.path.isdir(path) and os.path.exists(os.path.join(path, "trainer_state.json"))):
            return real_rmtree(path, *args, **kwargs)
        for name in TENSOR_FILES:  # part of it deleted (the state file last), then the kill
            os.remove(os.path.join(path, name))
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(Killed):
        save(tmp_path, 3, model, optimizer, scheduler)  # prunes step 1
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    root = tmp_path / "checkpoints"
    counted = checkpoint_dirs(root)
    assert [p.name for p in counted] == ["step-00000002", "step-00000003"]
    for directory in counted:
        assert all((directory / name).is_file() for name in TENSOR_FILES), directory
    newest = latest_checkpoint(tmp_path)
    assert newest == root / "step-00000003"
    fresh = build_model(0.0)
    fresh_optimizer = build_optimizer(fresh, lr=1e-3)
    restored = load_checkpoint(
        newest, fresh, fresh_optimizer, build_scheduler(fresh_optimizer, 10, 0)
    )
    assert restored.step == 3 and restored.state["step_note"] == 3
    trainable = [p for p in fresh.parameters() if p.requires_grad]
    assert trainable and all(torch.equal(p, torch.full_like(p, 3.0)) for p in trainable)
    (leftover,) = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert "step-00000001" in leftover.name and not (leftover / TENSOR_FILES[0]).exists()
    dead = leftover.with_name(leftover.name.rsplit("-", 1)[0] + "-4194999")  # no such process
    leftover.rename(dead)  # (as left by a killed process)
    os.utime(dead, (time.time() - 600, time.time() - 600))
    save(tmp_path, 4, model, optimizer, scheduler)  # a later save removes the leftover
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


def test_pruning_keeps_the_newest_and_leaves_no_temporary(tmp_path):
    model = build_model(0.0)
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=0)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    prune(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
