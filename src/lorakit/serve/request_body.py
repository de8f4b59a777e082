"""A request's raw body into its JSON object (``parse_body``), with ``protocol``'s 400s: not
JSON, nested too deeply, or holding text that is not valid Unicode. Its cost is bounded by the
body's size and nesting depth (``read_json`` bounds the size as it reads and parses a large
body off the event loop)."""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from lorakit.serve.protocol import APIError

__all__ = ["parse_body", "read_body", "read_json"]

_PARSED_INLINE = 64 << 10  # bodies up to this size are parsed on the event loop (fast)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (its size bounded as it was read: ``read_json``):
    400 when not a JSON object, nested too deeply to parse, or holding a string that is not
    valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON allows but no tokenizer or
    UTF-8 encoder accepts). Memory beyond the parsed object: one iterator per nesting level."""
    with _collector_paused():
        body = _json_object(raw)
        if _may_hold_surrogates(raw):
            _require_unicode(body)
    return body


def _json_object(raw: bytes) -> dict[str, Any]:
    """``json.loads(raw)``, a 400 (``invalid_json``) unless it is a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(
            400, f"the request body is not valid JSON: {error}", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(
            400, "the request body is nested too deeply to parse", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (unless it was off already). Each
    container ``json.loads`` makes counts towards the next collection, and a body of 1 MiB
    holds up to ~350,000 lists: in a server process holding the model's hundreds of thousands
    of objects, the full collections they triggered took ~0.5 s (the GIL held: the event loop
    stalled) for a parse of ~0.03 s. Parsing and checking make no garbage cycles: the
    collector has nothing to find meanwhile (it runs again after)."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# What ``json.loads`` turns into a surrogate code point in a UTF-8 body: an escape \uD800 to
# \uDFFF (any case; a pair of them is one valid character, found by the walk), or the 3-byte
# UTF-8 form of one (ED A0..BF xx), which ``json.loads`` decodes with "surrogatepass".
_SURROGATE_BYTES = re.compile(rb"\\[uU][dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _may_hold_surrogates(raw: bytes) -> bool:
    """False only when no string of the body can hold a surrogate: a UTF-8 body (as
    ``json.loads`` detects it) with none of ``_SURROGATE_BYTES``. A UTF-16 or UTF-32 body (which
    ``json.loads`` decodes with "surrogatepass" too) is always walked."""
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        return True
    return _SURROGATE_BYTES.search(raw) is not None


def _require_unicode(body: dict[str, Any]) -> None:
    """400 naming the first field (path like ``messages[0].content``) whose text, or key, holds
    a lone surrogate. Walks depth first with a stack of iterators, one per open container (the
    body may be nested as deep as the parser allowed): its memory grows with the depth, never
    with the number of values, and a path is spelled out only for the bad string."""
    steps: list[str | int] = []  # the keys and indices from the body to the open container
    stack = [iter(body.items())]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            if steps:
                steps.pop()
            continue
        step, value = entry
        if isinstance(step, str) and _invalid_text(step):
            path = _path([*steps, step])
            _require_valid_text(step, f"the key '{path}'", path)
        if isinstance(value, dict):
            steps.append(step)
            stack.append(iter(value.items()))
        elif isinstance(value, list):
            steps.append(step)
            stack.append(enumerate(value))
        elif isinstance(value, str) and _invalid_text(value):
            path = _path([*steps, step])
            _require_valid_text(value, f"'{path}'", path)


def _invalid_text(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(steps: list[str | int]) -> str:
    """``messages[0].content`` for the steps ``["messages", 0, "content"]`` (keys shown with
    their surrogates escaped)."""
    path = ""
    for step in steps:
        if isinstance(step, int):
            path = f"{path}[{step}]"
        else:
            printable = step.encode("utf-8", "backslashreplace").decode("utf-8")
            path = f"{path}.{printable}" if path else printable
    return path


def _require_valid_text(text: str, what: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(
            400,
            f"{what} holds an unpaired surrogate U+{ord(text[error.start]):04X} at character "
            f"{error.start}; send valid Unicode text",
            param=re.split(r"[.\[]", path, maxsplit=1)[0],
        ) from None


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request's JSON object (``parse_body``), its body read only while it stays
    within ``max_bytes``: a larger one is a 413 from its Content-Length (nothing read) or as
    soon as the bytes received pass the limit (a chunked body), so a client cannot make the
    server hold more than the limit in memory. A body over ``_PARSED_INLINE`` bytes is parsed
    in a worker thread: its Unicode check (``request_body._require_unicode``) never stalls the
    event loop."""
    raw = await read_body(request, max_bytes)
    if len(raw) <= _PARSED_INLINE:
        return parse_body(raw)
    return await run_in_threadpool(parse_body, raw)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's raw body, read only while it stays within ``max_bytes``: a 413
    (``request_too_large``) from its Content-Length when that says more (nothing read), else as
    soon as the bytes received pass the limit ("more than N bytes": a chunked body). The reader
    of ``read_json``, and of the Ray Serve ingress (``ray_deployment``), which forwards the body
    it read, so that both answer a body too large alike."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > max_bytes:
            raise _too_large(len(received), max_bytes, at_least=True)
    return bytes(received)


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> APIError:
    more = "more than " if at_least else ""
    return APIError(
        413,
        f"request body of {more}{size} bytes exceeds the limit of {max_bytes} bytes",
        code="request_too_large",
    )
