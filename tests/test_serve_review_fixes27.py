"""Serving fixes of review 27: vLLM's ``min_tokens``, ``ignore_eos`` and
``include_stop_str_in_output`` implemented (they were silently ignored) and ``use_beam_search``,
``length_penalty``, ``truncate_prompt_tokens`` and a completion's ``top_logprobs`` refused by
name; huge ``merged_adapters`` numbers, a mixture's non-integer ``rank`` / ``seed`` and an SVD
mixture's ``rank`` over the bank's ``max_rank`` answered with a 400 naming the entry; a 429
before the adapter is loaded (no eviction); a broken adapter directory a 400 naming it (not a
404); a bad ``--admin-token-file`` reported before the model loads.

``min_tokens`` is checked against a greedy loop written out on the model's full forward with
the stop tokens' logits at -inf for the first ``min_tokens`` steps (vLLM's rule), with an EOS
that the model picks first (so the request would end at once without it)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from lorakit.serve.engine import Engine
from lorakit.serve.protocol import APIError, parse_job
from lorakit.serve.sampling import SamplingParams
from tests import serving
from tests.serving import BASE, Served, assert_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = serving.PROMPT


@pytest.fixture
def root(adapter_files, tmp_path):
    shutil.copytree(adapter_files[0] / "adapters", tmp_path / "adapters")
    return tmp_path


def masked_greedy(model, stops: set[int], min_tokens: int, max_tokens: int) -> list[int]:
    """vLLM's greedy ``min_tokens``: the ``stops`` masked for ``min_tokens`` tokens, then ending
    the output (``serving.masked_greedy``)."""
    return serving.masked_greedy(model, PROMPT, stops, min_tokens, max_tokens, stops)


def generate(model, eos: int, **fields):
    with Engine(model, None, None, eos_token_ids=[eos]) as engine:
        ids, _, last = engine.generate(PROMPT, None, SamplingParams(**fields))
    return ids, last


# ----------------------------------------------------------------- min_tokens, ignore_eos


@pytest.mark.parametrize("min_tokens", [0, 1, 4])
def test_min_tokens_is_greedy_generation_with_eos_masked(greedy_model, min_tokens) -> None:
    model, eos = greedy_model
    ids, last = generate(model, eos, max_tokens=10, min_tokens=min_tokens)
    expected = masked_greedy(model, {eos}, min_tokens, 10)
    assert ids == expected
    assert len(ids) >= min_tokens and eos not in ids
    if min_tokens == 0:
        assert ids == []  # the model's first choice is EOS: the request ends at once
    assert last.finish_reason == ("stop" if len(ids) < 10 else "length")


def test_min_tokens_masks_stop_token_ids_too(greedy_model) -> None:
    model, first = greedy_model
    eos = (first + 1) % model.config.vocab_size  # the model's first choice is a stop token id
    fields = {"max_tokens": 8, "min_tokens": 3, "stop_token_ids": (first,)}
    ids, _ = generate(model, eos, **fields)
    assert ids == masked_greedy(model, {eos, first}, 3, 8)
    assert len(ids) >= 3


def test_min_tokens_holds_for_sampled_requests(greedy_model) -> None:
    model, eos = greedy_model
    for seed in range(4):
        ids, _ = generate(model, eos, max_tokens=6, min_tokens=5, temperature=0.7, seed=seed)
        assert len(ids) >= 5 and eos not in ids[:5]


def test_ignore_eos_generates_to_max_tokens_with_eos_as_a_token(greedy_model) -> None:
    model, eos = greedy_model
    ids, last = generate(model, eos, max_tokens=6, ignore_eos=True)
    assert ids == masked_greedy(model, set(), 0, 6)  # no token ends it: plain greedy
    assert ids[0] == eos and last.finish_reason == "length" and last.completion_tokens == 6


def test_ignore_eos_still_stops_at_stop_token_ids(greedy_model) -> None:
    model, eos = greedy_model
    plain = masked_greedy(model, set(), 0, 6)
    stop_id = next(token for token in plain if token != eos)
    ids, last = generate(model, eos, max_tokens=6, ignore_eos=True, stop_token_ids=(stop_id,))
    assert ids == plain[: plain.index(stop_id)] and last.finish_reason == "stop"


def test_min_tokens_over_max_tokens_is_a_400() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "min_tokens": 4}
    with pytest.raises(APIError) as caught:
        parse_job(body, chat=False, max_tokens_limit=16)
    assert caught.value.status == 400 and caught.value.param == "min_tokens"
    assert "min_tokens" in caught.value.message
    for bad in (-1, 1.5, True):
        with pytest.raises(APIError) as caught:
            parse_job({**body, "min_tokens": bad}, chat=False, max_tokens_limit=16)
        assert caught.value.param == "min_tokens"


def test_the_new_fields_reach_the_sampling_params() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 5, "min_tokens": 2, "ignore_eos": True}
    params = parse_job(
        {**body, "include_stop_str_in_output": True}, chat=False, max_tokens_limit=16
    ).params
    assert (params.min_tokens, params.ignore_eos, params.include_stop_str_in_output) == (
        2,
        True,
        True,
    )
    with pytest.raises(APIError) as caught:
        parse_job({**body, "ignore_eos": 1}, chat=False, max_tokens_limit=16)
    assert caught.value.param == "ignore_eos"


@pytest.mark.parametrize(
    ("name", "value", "neutral"),
    [
        ("use_beam_search", True, False),
        ("length_penalty", 0.5, 1.0),
        ("truncate_prompt_tokens", 5, None),
        ("top_logprobs", 3, None),
    ],
)
def test_unimplemented_vllm_fields_are_refused_by_name(name, value, neutral) -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    with pytest.raises(APIError) as caught:
        parse_job({**body, name: value}, chat=False, max_tokens_limit=16)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, name, "unsupported_parameter")
    assert name in error.message
    parse_job({**body, name: neutral}, chat=False, max_tokens_limit=16)  # asks for nothing


# ----------------------------------------------------------------- stop strings over HTTP


def _text(served: Served, **fields) -> tuple[str, str]:
    """(text, finish reason) of a greedy completion of the base model (it repeats
    " negative"), whole; checked equal to the stream."""
    body = {"model": BASE, "prompt": "hello world", "max_tokens": 16, "temperature": 0}
    body.update(fields)
    whole = served.post("/v1/completions", body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    streamed = served.post("/v1/completions", {**body, "stream": True})
    chunks = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    return choice["text"], choice["finish_reason"]


def _stop_inside(text: str) -> tuple[str, int]:
    """A two-character stop string found in ``text`` first after its first 3 characters, and
    again later."""
    for start in range(3, len(text) - 2):
        stop = text[start : start + 2]
        if stop.isalpha() and text.find(stop) == start and text.count(stop) > 1:
            return stop, start
    raise AssertionError(f"no stop string in {text!r}")


def test_include_stop_str_in_output_keeps_the_stop_string(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    with served.client:
        plain, reason = _text(served)
        assert reason == "length"
        stop, start = _stop_inside(plain)
        assert _text(served, stop=[stop]) == (plain[:start], "stop")
        kept = _text(served, stop=[stop], include_stop_str_in_output=True)
        assert kept == (plain[: start + len(stop)], "stop")


def test_stop_strings_within_min_tokens_do_not_stop(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    tokenizer = adapter_files[1]
    prompt_ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    with served.client:
        plain_ids, plain, _ = served.engine.generate(prompt_ids, None, SamplingParams(16))
        assert _text(served)[0] == plain
        stop, start = _stop_inside(plain)

        def text_of(count: int) -> str:
            return tokenizer.decode(plain_ids[:count], skip_special_tokens=True)

        # the fewest tokens whose text holds the first stop string: it is within min_tokens
        min_tokens = next(n for n in range(17) if len(text_of(n)) >= start + len(stop))
        text, reason = _text(served, stop=[stop], min_tokens=min_tokens)
        floor = len(text_of(min_tokens))  # a stop string must end after this
        later = plain.find(stop, max(0, floor - len(stop) + 1))
        assert (text, reason) == ((plain[:later], "stop") if later >= 0 else (plain, "length"))
        assert len(text) > start  # the first stop string did not end it


# ----------------------------------------------------------------- merged_adapters


def _mixture(served: Served, **mixture):
    body = {"model": BASE, "prompt": "hello world", "max_tokens": 2, "merged_adapters": mixture}
    return served.post(
        "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )


def test_huge_mixture_numbers_are_a_400_naming_the_entry(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    with served.client:
        response = _mixture(served, ids=["ad0"], weights=[10**400])
        assert_error(response, 400, "merged_adapters.weights", "merged_adapters.weights")
        response = _mixture(served, ids=["ad0", "ad1"], merge_strategy="ties", density=10**400)
        assert_error(response, 400, "merged_adapters.density", "merged_adapters.density")
        assert served.app.state.mixtures.combined == 0


@pytest.mark.parametrize(
    ("key", "value"), [("rank", 2.0), ("rank", True), ("seed", 1.5), ("seed", "1")]
)
def test_mixture_rank_and_seed_must_be_integers(root, adapter_files, key, value) -> None:
    served = Served(root, adapter_files[1])
    method = "svd" if key == "rank" else "dare_linear"
    fields = {} if key == "rank" else {"density": 0.5}
    with served.client:
        response = _mixture(
            served, ids=["ad0", "ad1"], merge_strategy=method, **fields, **{key: value}
        )
        assert_error(response, 400, f"merged_adapters.{key}", "must be an integer")


@pytest.mark.parametrize("method", ["svd", "ties", "dare_linear"])
def test_an_svd_rank_over_max_rank_is_refused_for_its_method(root, adapter_files, method) -> None:
    served = Served(root, adapter_files[1])  # bank max_rank 4; ad0..ad3 have r=2
    fields = {} if method == "svd" else {"density": 0.5}
    three = ["ad0", "ad1", "ad2"]  # ranks adding up to 6
    with served.client:
        response = _mixture(served, ids=three, merge_strategy=method, rank=6, **fields)
        error = assert_error(response, 400, "merged_adapters.rank", "max_rank 4", "<= 4")
        assert repr(method) in error["message"] and "'cat'" not in error["message"]
        assert served.app.state.mixtures.combined == 0  # refused before combining
        fine = _mixture(served, ids=three, merge_strategy=method, rank=4, **fields)
        assert fine.status_code == 200, fine.text
        # svd of two r=2 inputs' summed update has rank <= 4 whatever rank is asked for (TIES
        # and DARE edit the update, whose rank can then be the one asked for)
        capped = _mixture(served, ids=["ad0", "ad1"], merge_strategy=method, rank=6, **fields)
        assert capped.status_code == (200 if method == "svd" else 400), capped.text


# ----------------------------------------------------------------- 429 before the adapter


def test_a_full_queue_answers_429_before_loading_the_adapter(root, adapter_files) -> None:
    served = Served(root, adapter_files[1])
    with served.client:
        for model in ("ad0", "ad1"):
            assert (
                served.post("/v1/completions", serving.completion(model=model)).status_code == 200
            )
        loaded, evictions = served.bank.names(), served.bank.evictions
        served.engine.max_waiting = 0  # the waiting queue is full from now on
        response = served.post("/v1/completions", serving.completion(model="ad2"))
        error = assert_error(response, 429, None, "busy")
        assert error["code"] == "queue_full" and response.headers["retry-after"] == "1"
        response = _mixture(served, ids=["ad2", "ad3"])
        assert_error(response, 429, None, "busy")
        assert served.bank.names() == loaded and served.bank.evictions == evictions
        assert served.app.state.mixtures.combined == 0


# ----------------------------------------------------------------- broken adapter directories


def _break(directory, how: str) -> None:
    if how == "config":
        (directory / "adapter_config.json").write_text("{not json")
    elif how == "no weights":
        (directory / "adapter_model.safetensors").unlink()
    else:  # a truncated file
        weights = directory / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize("how", ["config", "no weights", "truncated"])
def test_a_broken_adapter_directory_is_a_400_naming_it(root, adapter_files, caplog, how) -> None:
    served = Served(root, adapter_files[1])
    broken = root / "adapters" / "broken"
    shutil.copytree(root / "adapters" / "ad0", broken)
    _break(broken, how)
    with served.client, caplog.at_level(logging.WARNING):
        for _ in range(3):
            response = served.post("/v1/completions", serving.completion(model="broken"))
            error = assert_error(response, 400, "model", "'broken'", "cannot be served")
            assert "does not exist" not in error["message"]
            assert str(root.resolve()) not in error["message"]  # no server paths
        mixed = _mixture(served, ids=["ad0", "broken"])
        assert_error(mixed, 400, "merged_adapters.ids", "'broken'", "cannot be served")
        warnings = [r for r in caplog.records if "not serving adapter 'broken'" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not on every request
        shutil.rmtree(broken)
        shutil.copytree(root / "adapters" / "ad1", broken)  # repaired: served
        assert served.post("/v1/completions", serving.completion(model="broken")).status_code == 200


# ----------------------------------------------------------------- --admin-token-file


def test_a_missing_admin_token_file_is_reported_before_the_model_loads(
    tmp_path, monkeypatch
) -> None:
    from lorakit import cli
    from lorakit.commands import serve
    from lorakit.errors import UserError

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "adapters").mkdir()
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--model",
            str(tmp_path / "no-such-model"),
            "--adapters",
            str(tmp_path / "adapters"),
            "--admin-token-file",
            str(tmp_path / "missing-token"),
        ]
    )
    with pytest.raises(UserError) as caught:
        serve.build(args)
    assert "--admin-token-file" in str(caught.value) and "missing-token" in str(caught.value)


def test_min_tokens_over_the_room_a_prompt_leaves_is_a_400() -> None:
    from lorakit.serve.app import _fit_max_tokens

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 20}
    job = parse_job(body, chat=True, max_tokens_limit=64)  # max_tokens unset: the rest
    assert _fit_max_tokens(job, 40, 64).params.max_tokens == 24  # room for 20
    with pytest.raises(APIError) as caught:
        _fit_max_tokens(job, 50, 64)  # room for 14 < min_tokens
    assert (caught.value.status, caught.value.param) == (400, "min_tokens")
    assert "room for only 14" in caught.value.message
