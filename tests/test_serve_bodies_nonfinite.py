"""Log-probabilities JSON cannot carry (-inf: a token ruled out; NaN: a broken adapter's
logits) are sent as ``LOWEST_LOGPROB``, so every body parses as strict JSON (a NaN made the
server answer 500, or stream ``NaN``, which is not JSON)."""

from __future__ import annotations

import json
import math

import pytest

from lorakit.serve.bodies import LOWEST_LOGPROB, chat_logprobs, completion_logprobs
from lorakit.serve.sampling import TokenLogprob


def _strict(body) -> object:
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(json.dumps(body), parse_constant=refuse)


def _piece(token_id: int) -> tuple[str, bytes]:
    return f"t{token_id}", f"t{token_id}".encode()


ENTRIES = [
    TokenLogprob(1, math.nan, ((1, math.nan), (2, -math.inf), (3, -0.5))),
    TokenLogprob(2, -math.inf, ((2, -math.inf),)),
    TokenLogprob(3, -0.25, ((3, -0.25), (4, -20000.0))),
]


@pytest.mark.parametrize("build", [chat_logprobs, completion_logprobs])
def test_non_finite_logprobs_are_sent_as_the_lowest_and_parse_as_strict_json(build):
    body = _strict(build(ENTRIES, _piece))
    if build is chat_logprobs:
        sent = [item["logprob"] for item in body["content"]]
        tops = [[top["logprob"] for top in item["top_logprobs"]] for item in body["content"]]
    else:
        sent = body["token_logprobs"]
        tops = [list(top.values()) for top in body["top_logprobs"]]
    assert sent == [LOWEST_LOGPROB, LOWEST_LOGPROB, -0.25]
    assert tops == [
        [LOWEST_LOGPROB, LOWEST_LOGPROB, -0.5],
        [LOWEST_LOGPROB],
        [-0.25, LOWEST_LOGPROB],
    ]
