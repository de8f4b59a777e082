"""The ``tokenizer.*`` keys of a GGUF model, as llama.cpp reads them.

For a byte-level BPE tokenizer (GPT-2 style: SmolLM2, Qwen2) llama.cpp needs
``tokenizer.ggml.model = "gpt2"``, ``.pre`` (which pre-tokenizer regexes to use), ``.tokens``
(every id's string), ``.token_type`` (1 normal, 3 control = special added token, 4 user-defined
= other added token, 5 unused padding id), ``.merges`` ("a b" strings), the bos/eos/unk/padding
ids, ``.add_bos_token`` (and ``.add_eos_token`` when EOS is added: absent means no) and
``tokenizer.chat_template``. Whether BOS / EOS are added is what the tokenizer does when it
encodes (``added_special_tokens``: a post-processor such as Llama 3's adds BOS though its
``add_bos_token`` attribute is False), which is what llama.cpp's converter reads from it.
llama.cpp's converter picks ``.pre`` by hashing the tokenizer's output on a test text; lorakit
reads it from the tokenizer's own ``pre_tokenizer`` (tokenizer.json): the layouts in
``PRE_TOKENIZERS`` are those whose splitting llama.cpp's named regexes reproduce exactly; any
other layout is refused unless the caller names ``.pre`` itself (``pre_tokenizer=``, the CLI's
``--gguf-pre``): llama.cpp's "default" splits otherwise than any of them. A model converted from
a GGUF file copies that file's keys instead (``copied_keys``), which is exact.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lorakit.errors import UserError

__all__ = [
    "LLAMA_CPP_PRE_TOKENIZERS",
    "PRE_TOKENIZERS",
    "added_special_tokens",
    "check_pre_tokenizer_name",
    "copied_keys",
    "pre_tokenizer_layout",
    "pre_tokenizer_name",
    "tokenizer_keys",
]

# The split regexes of Llama 3 (tiktoken's cl100k, digits in groups of up to 3) and Qwen2 (digits
# one by one), as their tokenizer.json files hold them; llama.cpp's "llama-bpe" / "qwen2" are these.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1)
GPT2_BYTE_LEVEL = ("ByteLevel", "gpt-2 regex")  # ByteLevel(use_regex=True, add_prefix_space=False)
BYTES_ONLY = ("ByteLevel", "bytes only")  # ByteLevel(use_regex=False, add_prefix_space=False)

# pre_tokenizer layout (``pre_tokenizer_layout``) -> tokenizer.ggml.pre, llama.cpp's regexes for it
PRE_TOKENIZERS = {
    (GPT2_BYTE_LEVEL,): "gpt-2",  # GPT-2 and its kin: the GPT-2 regex
    (("Digits", "individual"), GPT2_BYTE_LEVEL): "smollm",  # SmolLM/SmolLM2: each digit alone first
    (("Split", LLAMA3_SPLIT, "Isolated"), BYTES_ONLY): "llama-bpe",  # Llama 3
    (("Split", QWEN2_SPLIT, "Isolated"), BYTES_ONLY): "qwen2",  # Qwen2 / Qwen2.5
}

# Every tokenizer.ggml.pre that llama.cpp's vocabulary loader accepts (llama-vocab.cpp's
# ``tokenizer_pre == "..."`` comparisons); it refuses a model file with any other name.
_LLAMA_CPP_PRE_NAMES = """
    a.x-4.0 afmoe bailingmoe bailingmoe2 bloom chameleon chatglm-bpe codeshell cohere2moe
    command-r dbrx deepseek-coder deepseek-llm deepseek-r1-qwen deepseek-v3 default exaone
    exaone-moe exaone4 f2llmv2 falcon falcon-h1 falcon3 gemma4 gigachat glm4 gpt-2 gpt-4o
    gpt3-finnish granite-docling granite-embed-multi-311m granite-embed-multi-97m grok-2 hunyuan
    hunyuan-dense hy_v4 jais jais-2 jina-de jina-es jina-v1-en jina-v2-code jina-v2-de jina-v2-es
    jina-v5-nano joyai-llm kanana2 kimi-k2 kormo laguna lfm2 llada-moe llama-bpe llama-v3 llama3
    llama4 megrez mellum mellum2 midm-2.0 minerva-7b minicpm5 minimax-m2 modern-bert mpt olmo
    phi-2 pixtral poro-chat qwen2 qwen35 refact roberta-bpe sarvam-moe seed-coder smaug-bpe smollm
    solar-open spark2_5 stablelm2 starcoder superbpe talkie tekken tiny_aya trillion ufakzeka
    viking whitespace youtu
"""
LLAMA_CPP_PRE_TOKENIZERS = frozenset(_LLAMA_CPP_PRE_NAMES.split())

Entry = tuple[str, Any, Any, Any]  # (key, value, GGUFValueType, array element type or None)


def copied_keys(path: str | os.PathLike[str]) -> list[Entry]:
    """Every ``tokenizer.*`` key of the GGUF file at ``path``, with its stored types."""
    import gguf

    reader = gguf.GGUFReader(path)
    entries = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            is_array = field.types[0] == gguf.GGUFValueType.ARRAY
            sub_type = field.types[-1] if is_array else None
            entries.append((key, field.contents(), field.types[0], sub_type))
    return entries


def tokenizer_keys(tokenizer, vocab_size: int, *, pre_tokenizer: str | None = None) -> list[Entry]:
    """The ``tokenizer.*`` entries for a transformers fast tokenizer with a byte-level BPE model;
    ``vocab_size``: the model's (ids the tokenizer lacks become unused ``[PAD<id>]`` tokens);
    ``pre_tokenizer``: the ``tokenizer.ggml.pre`` to write, else the one that the tokenizer's
    own pre-tokenizer is (``pre_tokenizer_name``; ``UserError`` for a layout it does not know)."""
    import gguf

    if pre_tokenizer is not None:
        check_pre_tokenizer_name(pre_tokenizer)
    described = _bpe_description(tokenizer)
    pre = pre_tokenizer or pre_tokenizer_name(described.get("pre_tokenizer"))
    V = gguf.GGUFValueType
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in described["model"]["merges"]]
    entries: list[Entry] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    add_bos, add_eos = added_special_tokens(tokenizer)
    entries.append(("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None))
    if add_eos:  # absent means no EOS to llama.cpp (as its converter leaves it out)
        entries.append(("tokenizer.ggml.add_eos_token", True, V.BOOL, None))
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
            entries.append((f"tokenizer.ggml.{key}_token_id", int(token_id), V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        entries.append(("tokenizer.chat_template", template, V.STRING, None))
    return entries


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """The ``tokenizer.ggml.pre`` whose regexes split text as ``pre_tokenizer`` (the
    ``pre_tokenizer`` object of a tokenizer.json) does: a ``PRE_TOKENIZERS`` layout, else
    ``UserError`` naming the layout and how to name ``.pre`` yourself."""
    layout = pre_tokenizer_layout(pre_tokenizer)
    name = PRE_TOKENIZERS.get(layout) if layout is not None else None
    if name is None:
        raise UserError(
            "GGUF export: this tokenizer's pre-tokenizer "
            f"{json.dumps(pre_tokenizer)[:300]} is none that lorakit recognises (GPT-2's "
            "ByteLevel, SmolLM's Digits + ByteLevel, Llama 3's or Qwen2's Split + ByteLevel), so "
            "it cannot tell which tokenizer.ggml.pre makes llama.cpp split text the same way. "
            "Name it yourself (--gguf-pre NAME, pre_tokenizer=NAME; llama.cpp's names, e.g. "
            "gpt-2, llama-bpe, qwen2, smollm) and check llama.cpp's tokens, or use llama.cpp's "
            "convert_hf_to_gguf.py on the (merged) model directory."
        )
    return name


def check_pre_tokenizer_name(name: str) -> None:
    """``UserError`` unless ``name`` (``--gguf-pre``, ``pre_tokenizer=``) is one of
    ``LLAMA_CPP_PRE_TOKENIZERS``: llama.cpp refuses to load a model whose tokenizer.ggml.pre it
    does not know. The message lists the known names closest to ``name`` (``difflib``)."""
    import difflib

    if name in LLAMA_CPP_PRE_TOKENIZERS:
        return
    close = difflib.get_close_matches(name, sorted(LLAMA_CPP_PRE_TOKENIZERS), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. gpt-2, llama-bpe, qwen2, smollm"
    raise UserError(
        f"--gguf-pre {name!r} (pre_tokenizer=): llama.cpp knows no pre-tokenizer of that name and "
        f"would refuse to load the file; give one of llama.cpp's names ({hint})"
    )


def pre_tokenizer_layout(pre_tokenizer: dict[str, Any] | None) -> tuple | None:
    """``pre_tokenizer`` (tokenizer.json's object) as the tuple of its steps that decide where
    text is split (``PRE_TOKENIZERS``' keys), or None for a step of another kind."""
    if not isinstance(pre_tokenizer, dict):
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else None
    steps = [pre_tokenizer] if steps is None else steps
    layout = tuple(_step(step) for step in steps if isinstance(step, dict))
    return None if None in layout or len(layout) != len(steps) else layout


def _step(step: dict[str, Any]) -> tuple | None:
    """One pre-tokenizer step as a ``PRE_TOKENIZERS`` key part, or None if lorakit does not know
    how llama.cpp would split like it (``add_prefix_space`` puts a space llama.cpp does not)."""
    kind = step.get("type")
    if kind == "ByteLevel" and not step.get("add_prefix_space", True):
        return GPT2_BYTE_LEVEL if step.get("use_regex", True) else BYTES_ONLY
    if kind == "Digits" and step.get("individual_digits") is True:
        return ("Digits", "individual")
    pattern = step.get("pattern") or {}
    if kind == "Split" and "Regex" in pattern and step.get("invert") is False:
        return ("Split", pattern["Regex"], step.get("behavior"))
    return None


PROBE = "Hello world"  # any text without special tokens


def added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """``(adds BOS, adds EOS)``: what the tokenizer does when it encodes with
    ``add_special_tokens=True`` (a ``TemplateProcessing`` post-processor, as Llama 3's, or a
    tokenizer class's own flags): the first id is the BOS id (the last the EOS id) and the
    encoding without special tokens does not start (end) with it. The ``add_bos_token``
    attribute alone says False for a post-processor that adds BOS."""
    full = list(tokenizer.encode(PROBE, add_special_tokens=True))
    plain = list(tokenizer.encode(PROBE, add_special_tokens=False))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return adds_bos, adds_eos


def _bpe_description(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = json.loads(backend.to_str()) if backend is not None else {}
    model = described.get("model") or {}
    pre = json.dumps(described.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise UserError(
            f"GGUF export describes byte-level BPE tokenizers (GPT-2 style) only; this "
            f"{type(tokenizer).__name__} is {model.get('type')!r} with pre-tokenizer {pre[:80]}. "
            "Use llama.cpp's convert_hf_to_gguf.py on the (merged) model directory."
        )
    return described


def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if max(by_id, default=-1) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}"
        )
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            special = added[token_id].special
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]
