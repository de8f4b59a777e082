"""A completion's text is the text after its prompt (review 31): ``decode(prompt + generated)``
past the decoded prompt, as transformers' ``TextGenerationPipeline(return_full_text=False)``
and vLLM give it. A SentencePiece (Metaspace) decoder strips the first token's leading space,
so the generated ids decoded alone lost it: prompt "low rank" was served "lo abhisn adap",
not " lo abhisn adap", a stop string starting with the space never matched, and the
log-probabilities' token texts did not add up to the text. A byte-level BPE's text is
unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.commands.generate import continuation_text, generate_text
from lorakit.serve.requests import GenerationRequest
from lorakit.serve.sampling import SamplingParams, StopTextTracker
from lorakit.serve.token_pieces import prompt_tail, text_after
from tests import serving, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "low rank"


@pytest.fixture(scope="module")
def metaspace():
    return serving.metaspace_tokenizer()


@pytest.fixture(scope="module")
def byte_level():
    return tiny_tokenizer.build()


def reference_text(tokenizer, prompt_ids: list[int], generated: list[int]) -> str:
    """The text after the prompt in the decoded whole (transformers' pipeline, vLLM)."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def run_request(tokenizer, prompt_ids, tokens, eos=frozenset(), **fields):
    """Feed ``tokens`` to a request as the engine does: ``(the text each token sent, "" where
    none, output ids, finish reason)``."""
    fields.setdefault("max_tokens", len(tokens))
    request = GenerationRequest(list(prompt_ids), None, SamplingParams(**fields), lambda e: None)
    pieces, ids = [], []
    for token in tokens:
        piece = request.take(token, set(eos), tokenizer)
        if piece is None:
            pieces.append("")
            continue
        final, text, new_ids, _ = piece
        pieces.append(text)
        ids += new_ids
        if final is not None:
            return pieces, ids, final
    return pieces, ids, None


def test_a_metaspace_completion_keeps_its_first_token_s_space(metaspace) -> None:
    prompt_ids = metaspace.encode(PROMPT)
    generated = metaspace.encode(" lo abhisn adap")
    assert metaspace.convert_ids_to_tokens(generated)[0] == "\u2581lo"
    expected = reference_text(metaspace, prompt_ids, generated)
    assert expected == " lo abhisn adap"
    assert metaspace.decode(generated) == "lo abhisn adap"  # (what was served before)
    pieces, ids, final = run_request(metaspace, prompt_ids, generated)
    assert "".join(pieces) == expected and ids == generated and final == "length"
    assert pieces[0] == " lo"  # streamed from the first token on, its space with it
    # after a chat-like prompt ending in a special token: the tail skips it
    pieces, _, _ = run_request(metaspace, [*prompt_ids, metaspace.eos_token_id], generated)
    assert "".join(pieces) == expected
    # EOS ends it: no text of its own, the text before it unchanged
    eos = metaspace.eos_token_id
    pieces, ids, final = run_request(metaspace, prompt_ids, [*generated[:2], eos], eos={eos})
    assert ("".join(pieces), ids, final) == (" lo a", generated[:2], "stop")


@pytest.mark.parametrize(
    ("stop", "text"),
    [([" lo"], ""), ([" ab"], " lo"), ([" adap"], " lo abhisn"), (["n ad"], " lo abhis")],
)
def test_a_metaspace_stop_string_with_a_leading_space_stops(metaspace, stop, text) -> None:
    prompt_ids, generated = metaspace.encode(PROMPT), metaspace.encode(" lo abhisn adap")
    pieces, _, final = run_request(metaspace, prompt_ids, generated, stop=stop)
    assert ("".join(pieces), final) == (text, "stop")
    kept, _, final = run_request(
        metaspace, prompt_ids, generated, stop=stop, include_stop_str_in_output=True
    )
    assert ("".join(kept), final) == (text + stop[0], "stop")


def old_pieces(tokenizer, generated: list[int], **fields) -> list[str]:
    """The text each token sent before: the generated ids decoded alone, at each step."""
    params = SamplingParams(max_tokens=len(generated), **fields)
    tracker = StopTextTracker(params.stop, params.include_stop_str_in_output)
    pieces = []
    for count in range(1, len(generated) + 1):
        decoded = tokenizer.decode(generated[:count], skip_special_tokens=True)
        pieces.append(tracker.update(decoded, final=count == len(generated)))
        if tracker.stopped:
            break
    return pieces


@pytest.mark.parametrize(
    ("prompt", "continuation", "stop"),
    [
        ("Review: a warm,", " funny and moving film.", []),
        ("the quick brown", " fox costs 5€ ok", []),  # "€": three byte tokens, held back
        ("the quick brown", " fox costs 5€ ok", ["s 5"]),
        ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "I am fine", []),
    ],
)
def test_a_byte_level_completion_is_unchanged(byte_level, prompt, continuation, stop) -> None:
    prompt_ids = byte_level(prompt, add_special_tokens=False).input_ids
    generated = byte_level(continuation, add_special_tokens=False).input_ids
    pieces, _, _ = run_request(byte_level, prompt_ids, generated, stop=stop)
    assert pieces == old_pieces(byte_level, generated, stop=stop)
    assert "\ufffd" not in "".join(pieces)
    if not stop:
        assert "".join(pieces) == continuation == reference_text(byte_level, prompt_ids, generated)


def test_a_prompt_ending_inside_a_character_completes_it_in_the_text(byte_level) -> None:
    """The fallback where the tail's text is not the start of the joint text: the prompt ends
    with the first bytes of "€", the generated ids bring the last one and more."""
    euro = byte_level("€", add_special_tokens=False).input_ids
    assert len(euro) == 3 and byte_level.decode(euro[:2]).endswith("\ufffd")
    prompt_ids = byte_level("costs 5", add_special_tokens=False).input_ids + euro[:2]
    generated = [euro[2], *byte_level(" ok", add_special_tokens=False).input_ids]
    tail = prompt_tail(byte_level, prompt_ids)
    assert len(tail.ids) == 5 and tail.ids == tuple(prompt_ids[-5:])
    assert text_after(byte_level, tail, generated) == "€ ok"
    pieces, _, _ = run_request(byte_level, prompt_ids, generated)
    assert "".join(pieces) == "€ ok"


@pytest.fixture(scope="module")
def served(tmp_path_factory, metaspace):
    root = tmp_path_factory.mktemp("metaspace")
    (root / "adapters").mkdir()
    served = serving.Served(root, metaspace)
    with served.client:
        yield served


def streamed(served, body: dict) -> tuple[str, str | None, list[str]]:
    """``(text, finish reason, logprobs tokens)`` of a streamed completion."""
    response = served.client.post("/v1/completions", json={**body, "stream": True})
    text, finish, tokens = "", None, []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            tokens += (choice.get("logprobs") or {}).get("tokens", [])
    return text, finish, tokens


def test_served_metaspace_text_whole_streamed_and_logprobs(served, metaspace) -> None:
    prompt_ids = metaspace.encode(PROMPT)
    with torch.no_grad():
        out = serving.base_model(metaspace).generate(
            torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False
        )
    expected = reference_text(metaspace, prompt_ids, out[0, len(prompt_ids) :].tolist())
    assert expected.startswith(" ")  # the premise: the first new token is a "▁" token
    body = {"model": serving.BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    choice = served.post("/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "length"
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert "".join(tokens) == choice["text"]  # OpenAI's contract: the tokens make the text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert [expected[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens
    text, finish, stream_tokens = streamed(served, {**body, "logprobs": 0})
    assert (text, finish, stream_tokens) == (expected, "length", tokens)
    # a stop string starting with the space stops, whole and streamed
    stop = {**body, "stop": [expected[: expected.index(" ", 1)]]}
    choice = served.post("/v1/completions", stop).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("", "stop")
    assert streamed(served, stop)[:2] == ("", "stop")
    # prompt + completion reads as the whole decoded text: words not glued
    whole = metaspace.decode(out[0], skip_special_tokens=True)
    assert PROMPT + served.post("/v1/completions", body).json()["choices"][0]["text"] == whole


def test_lorakit_generate_keeps_the_space(metaspace) -> None:
    model = serving.base_model(metaspace)
    prompt_ids = metaspace.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)
    expected = reference_text(metaspace, prompt_ids, out[0, len(prompt_ids) :].tolist())
    assert expected.startswith(" ")
    assert generate_text(model, metaspace, PROMPT, max_new_tokens=6, raw=True) == expected
    generated = metaspace.encode(" lo abhisn")
    assert continuation_text(metaspace, prompt_ids, generated) == " lo abhisn"
