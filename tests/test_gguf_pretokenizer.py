"""``tokenizer.ggml.pre`` of a derived GGUF tokenizer (``gguf_tokenizer.pre_tokenizer_name``):
read from the tokenizer's own pre-tokenizer, refused for a layout lorakit does not know unless
named (``pre_tokenizer=`` / ``--gguf-pre``). Oracle: llama.cpp itself (llama-cpp-python)
tokenizes as the transformers tokenizer does, token for token, on texts with digit runs,
punctuation, contractions, runs of spaces, newlines and non-ASCII letters."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.export.gguf_model import export_model
from lorakit.export.gguf_tokenizer import tokenizer_keys
from tests import tiny_models, tiny_tokenizer
from tests.gguf_helpers import reader_fields

TEXTS = [
    "The film (released in 2024) costs $12,500 -- really?!",
    "Review: it's a \"must-see\"... 10/10 :) I'VE seen 1234567 of them",
    "  leading spaces,\ttabs\n\nand   runs   of spaces \n",
    "Ünïcödé: café, naïve, Straße, 東京 2025年, emoji 🙂!",
    "x=3.14159; y = -42e10 // 007 they'll we'd",
]
CORPUS = TEXTS * 20 + tiny_tokenizer.CORPUS * 20


# The Split regexes of Llama 3's and Qwen2's tokenizer.json files (transformers writes the same in
# convert_slow_tokenizer.py / tokenization_qwen2.py): digits in groups of up to 3, or one by one.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level(use_regex: bool = True) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


LAYOUTS = {  # tokenizer.ggml.pre -> a pre-tokenizer of that layout (as the models' tokenizer.json)
    "gpt-2": lambda: byte_level(),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level()]
    ),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level(use_regex=False)]
    ),
    "qwen2": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level(use_regex=False)]
    ),
}


def trained(pre_tokenizer) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS`` behind ``pre_tokenizer`` (merges across
    digits, spaces and letters, so that a different split gives different tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=tiny_tokenizer.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


def written_pre(tokenizer, **options) -> str:
    keys = {key: value for key, value, *_ in tokenizer_keys(tokenizer, len(tokenizer), **options)}
    return keys["tokenizer.ggml.pre"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_known_layout_gets_its_llama_cpp_name(name) -> None:
    assert written_pre(trained(LAYOUTS[name]())) == name


def test_the_tiny_gpt2_style_tokenizer_is_gpt2() -> None:
    assert written_pre(tiny_tokenizer.build()) == "gpt-2"


UNKNOWN = {
    "prefix space": lambda: pre_tokenizers.ByteLevel(add_prefix_space=True),
    "other split": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}{1,2}|\p{L}+|\s+"), "isolated"), byte_level(False)]
    ),
    "digits in runs": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=False), byte_level()]
    ),
}


@pytest.mark.parametrize("layout", sorted(UNKNOWN))
def test_an_unknown_layout_is_refused_naming_it_and_the_option(layout) -> None:
    tokenizer = trained(UNKNOWN[layout]())
    with pytest.raises(UserError) as refused:
        tokenizer_keys(tokenizer, len(tokenizer))
    message = str(refused.value)
    for part in (
        "pre-tokenizer",
        '"type": "',
        "--gguf-pre",
        "pre_tokenizer=",
        "convert_hf_to_gguf",
    ):
        assert part in message
    assert written_pre(tokenizer, pre_tokenizer="gpt-2") == "gpt-2"  # named: written as given


def test_the_option_reaches_the_file_and_the_cli(tmp_path) -> None:
    tokenizer = trained(UNKNOWN["other split"]())
    directory = tmp_path / "hf"
    model = tiny_models.save_llama_with_tokenizer(directory, tokenizer)
    with pytest.raises(UserError, match="--gguf-pre"):
        export_model(model, tmp_path / "refused.gguf", "f32", tokenizer=tokenizer)
    assert not (tmp_path / "refused.gguf").exists()
    export_model(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer, pre_tokenizer="llama-bpe")
    assert reader_fields(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "llama-bpe"
    command = ["export", str(directory), "--format", "gguf", "--output", str(tmp_path / "c.gguf")]
    assert main([*command, "--type", "f32", "--gguf-pre", "qwen2"]) == 0
    assert reader_fields(tmp_path / "c.gguf")["tokenizer.ggml.pre"] == "qwen2"


def test_the_option_is_refused_where_it_does_nothing(tmp_path, capsys) -> None:
    model = tiny_models.llama()
    with pytest.raises(UserError, match="copied exactly from"):
        export_model(
            model, tmp_path / "m.gguf", tokenizer_gguf=tmp_path / "x.gguf", pre_tokenizer="gpt-2"
        )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    output = str(tmp_path / "a.gguf")
    code = main(["export", str(adapter), "--format", "gguf", "--output", output, "--gguf-pre", "x"])
    assert code == 2
    assert "--gguf-pre goes with a model SOURCE" in capsys.readouterr().err


@pytest.mark.llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_llama_cpp_tokenizes_as_the_tokenizer(tmp_path, name) -> None:
    """The exported file, read by llama.cpp (vocabulary only), gives the transformers
    tokenizer's ids on every text; with llama.cpp's "default" at least one text differs (the
    check can fail)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = trained(LAYOUTS[name]())
    model = tiny_models.save_llama_with_tokenizer(tmp_path / "hf", tokenizer)

    def llama_cpp_tokens(**pre) -> list[list[int]]:
        path = tmp_path / f"{pre}.gguf"
        export_model(model, path, "f32", tokenizer=tokenizer, **pre)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            return [llm.tokenize(text.encode(), add_bos=False, special=False) for text in TEXTS]
        finally:
            llm.close()

    want = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    assert llama_cpp_tokens() == want
    assert llama_cpp_tokens(pre_tokenizer="default") != want
