"""Serving API fixes of review 29: a legacy completion's ``top_logprobs`` always holds the
sampled token (it held the top n alone, so ``logprobs: 0`` sent ``{}``; OpenAI: "The API will
always return the logprob of the sampled token, so there may be up to logprobs+1 elements",
and vLLM sends it) while chat's stays the n alternatives; vLLM's sampling constraints
(``bad_words``, ``allowed_token_ids``, ``guided_*``, ``structured_outputs``,
``prompt_logprobs``, ``logits_processors``, ``bad_words_ids``) refused by name instead of
silently ignored; chat's ``top_logprobs`` out of range named in the message as sent.

The log-probabilities are checked over HTTP with sampling (temperature 1.5, seeds), where the
sampled token is most often not the most likely one."""

from __future__ import annotations

import json
import shutil

import pytest

from lorakit.serve.bodies import completion_logprobs
from lorakit.serve.protocol import NEUTRAL_VALUES, APIError, parse_job
from lorakit.serve.sampling import TokenLogprob
from tests.serving import Served, assert_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = range(6)


@pytest.fixture
def served(adapter_files, tmp_path):
    shutil.copytree(adapter_files[0] / "adapters", tmp_path / "adapters")
    served = Served(tmp_path, adapter_files[1])
    with served.client:
        yield served


def _sampled(served: Served, count: int, seed: int, stream: bool = False) -> dict:
    """The legacy ``logprobs`` of a sampled completion (a stream's chunks joined)."""
    body = {
        "model": "ad0",
        "prompt": "the quick brown",
        "max_tokens": 8,
        "temperature": 1.5,
        "seed": seed,
        "logprobs": count,
        "stream": stream,
    }
    response = served.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["logprobs"]
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
            for key in joined:
                joined[key] += logprobs[key] if logprobs else []
    return joined


def _check_holds_sampled(logprobs: dict, count: int) -> int:
    """Every position's dict holds the sampled token at its logprob, and at most ``count``
    others, each at least as likely; returns how many positions needed the extra entry."""
    extra = 0
    assert logprobs["tokens"], logprobs
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top[token] == logprob
        assert 1 <= len(top) <= count + 1
        others = {text: value for text, value in top.items() if text != token}
        assert all(value >= logprob for value in others.values()), top
        extra += len(top) == count + 1
    return extra


def test_logprobs_0_sends_the_sampled_token_alone(served) -> None:
    for seed in SEEDS:
        logprobs = _sampled(served, 0, seed)
        assert logprobs["top_logprobs"] == [
            {token: logprob}
            for token, logprob in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
        ]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_1_holds_the_top_token_and_the_sampled_one(served, stream) -> None:
    extra = sum(_check_holds_sampled(_sampled(served, 1, seed, stream), 1) for seed in SEEDS)
    assert extra > 0  # the sampled token was below the top one somewhere: the added entry


def test_a_stream_sends_what_the_whole_response_sends(served) -> None:
    for count in (0, 1):
        assert _sampled(served, count, 3, stream=True) == _sampled(served, count, 3)


def test_chat_top_logprobs_stay_the_n_alternatives(served) -> None:
    """Chat's format is OpenAI's list of the n most likely, without the sampled token added."""
    differs = 0
    for top_logprobs in (0, 1):
        for seed in SEEDS:
            body = {
                "model": "ad0",
                "messages": [{"role": "user", "content": "the quick brown"}],
                "max_tokens": 6,
                "temperature": 1.5,
                "seed": seed,
                "logprobs": True,
                "top_logprobs": top_logprobs,
            }
            response = served.post("/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            content = response.json()["choices"][0]["logprobs"]["content"]
            for item in content:
                assert len(item["top_logprobs"]) == top_logprobs
                if top_logprobs:
                    best = item["top_logprobs"][0]
                    assert best["logprob"] >= item["logprob"]
                    differs += best["logprob"] > item["logprob"]
    assert differs > 0  # sampled tokens below the top one were not added to the list


def _piece(token_id: int) -> tuple[str, bytes]:
    return f"t{token_id}", f"t{token_id}".encode()


def test_completion_logprobs_adds_the_sampled_entry_only_when_missing() -> None:
    entries = [
        TokenLogprob(7, -3.0, ((1, -0.5), (2, -1.0))),  # sampled below the top 2: appended
        TokenLogprob(2, -1.0, ((1, -0.5), (2, -1.0))),  # among them: as it was
        TokenLogprob(4, -2.5, ()),  # logprobs: 0
    ]
    top = completion_logprobs(entries, _piece)["top_logprobs"]
    assert top == [
        {"t1": -0.5, "t2": -1.0, "t7": -3.0},
        {"t1": -0.5, "t2": -1.0},
        {"t4": -2.5},
    ]
    assert list(top[0]) == ["t1", "t2", "t7"]  # most likely first, the sampled one last


def test_a_sampled_token_sharing_an_alternatives_text_keeps_its_own_logprob() -> None:
    """Two ids with one text (e.g. two byte tokens, both sent as "\ufffd"): the key holds the
    sampled token's log-probability, so ``top[tokens[i]] == token_logprobs[i]`` holds."""
    body = completion_logprobs([TokenLogprob(9, -4.0, ((8, -0.5),))], lambda _: ("?", b"?"))
    assert body["top_logprobs"] == [{"?": -4.0}] and body["token_logprobs"] == [-4.0]


# ----------------------------------------------------------------- vLLM's constraints


CONSTRAINTS = [
    ("bad_words", ["the"], []),
    ("bad_words_ids", [[5]], []),
    ("allowed_token_ids", [5, 6], None),
    ("allowed_token_ids", [], None),  # allows nothing: not a neutral value
    ("logits_processors", ["my.module:Processor"], []),
    ("guided_choice", ["yes", "no"], None),
    ("guided_choice", [], None),
    ("guided_regex", "yes|no", None),
    ("guided_json", {"type": "object"}, None),
    ("guided_json", "{}", None),
    ("guided_grammar", 'root ::= "yes"', None),
    ("structured_outputs", {"choice": ["yes", "no"]}, {}),
    ("prompt_logprobs", 1, None),
    ("prompt_logprobs", 0, None),  # the prompt tokens' own log-probabilities
]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(("name", "value", "neutral"), CONSTRAINTS)
def test_vllm_constraints_are_refused_by_name(name, value, neutral, chat) -> None:
    body = {"model": "m", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    with pytest.raises(APIError) as caught:
        parse_job({**body, name: value}, chat=chat, max_tokens_limit=16)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, name, "unsupported_parameter")
    assert f"'{name}' is not supported" in error.message
    assert name in NEUTRAL_VALUES
    for asks_nothing in (None, neutral):
        parse_job({**body, name: asks_nothing}, chat=chat, max_tokens_limit=16)


def test_a_constraint_over_http_is_a_400_and_unknown_fields_still_pass(served) -> None:
    body = {"model": "ad0", "prompt": "the quick brown", "max_tokens": 4, "temperature": 0}
    for name, value, _ in CONSTRAINTS:
        error = assert_error(served.post("/v1/completions", {**body, name: value}), 400, name)
        assert error["code"] == "unsupported_parameter"
    plain = served.post("/v1/completions", body)
    assert plain.status_code == 200, plain.text
    unknown = served.post("/v1/completions", {**body, "some_future_field": 3})
    neutral = served.post("/v1/completions", {**body, "bad_words": [], "guided_regex": None})
    for response in (unknown, neutral):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


# ----------------------------------------------------------------- top_logprobs' message


@pytest.mark.parametrize("top", [21, -1])
def test_chat_top_logprobs_out_of_range_names_top_logprobs(top) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    with pytest.raises(APIError) as caught:
        parse_job({**body, "top_logprobs": top}, chat=True, max_tokens_limit=16)
    error = caught.value
    assert (error.status, error.param) == (400, "top_logprobs")
    assert error.message == f"'top_logprobs' must be in [0, 20], got {top}"
    assert parse_job({**body, "top_logprobs": 20}, chat=True, max_tokens_limit=16).params.logprobs
    with pytest.raises(APIError) as caught:  # completions: the count is 'logprobs'
        parse_job({"model": "m", "prompt": "hi", "logprobs": 21}, chat=False, max_tokens_limit=16)
    assert (
        caught.value.param == "logprobs" and "logprobs must be in [0, 20]" in caught.value.message
    )
