"""CLI review fixes: ``lorakit generate`` formats its prompt as the adapter was trained (the
prompt style ``lorakit train`` records), ``eval`` / ``train`` refuse a --max-length past a
learned position table, ``generate`` warns past a rotary model's max_position_embeddings, and
``inspect`` keeps PEFT's saved embedding matrix out of the adapter's parameter count."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import lorakit
from lorakit import data
from lorakit.commands import generate as generate_command
from lorakit.data.chat import chat_prompt_ids
from lorakit.io.read import read_adapter_header
from tests import tiny_models, tiny_tokenizer
from tests.cli_runs import run_cli, train_cli

PROMPT = "Review: good film\nSentiment:"
PROMPT_STYLE_METADATA_KEY = "lorakit.prompt_style"  # (io.save: in the file format)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fed_ids(monkeypatch):
    """The prompt ids ``lorakit generate`` gives the decoder, one list per call."""
    calls = []
    original = generate_command.engine_greedy

    def recording(model, prompt_ids, max_new_tokens):
        calls.append(list(prompt_ids))
        return original(model, prompt_ids, max_new_tokens)

    monkeypatch.setattr(generate_command, "engine_greedy", recording)
    return calls


def _train(model_dir, data_path, output) -> object:
    code = train_cli(
        model_dir,
        data_path,
        output,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--r",
        "4",
        "--target-modules",
        "q_proj,v_proj",
    )
    assert code == 0
    return output / "adapter"


def _generate(capsys, model_dir, *extra) -> tuple[int, str, str]:
    return run_cli(
        capsys, "generate", PROMPT, "--model", model_dir, "--max-new-tokens", "4", *extra
    )


def test_plain_trained_adapter_gets_the_training_prompt_ids(
    tmp_path, capsys, model_dir, jsonl, fed_ids
) -> None:
    adapter = _train(model_dir, jsonl, tmp_path / "run")
    assert read_adapter_header(adapter).metadata[PROMPT_STYLE_METADATA_KEY] == "plain"
    capsys.readouterr()
    code, default_out, err = _generate(capsys, model_dir, "--adapter", adapter)
    assert code == 0 and "note" not in err
    code, raw_out, _ = _generate(capsys, model_dir, "--adapter", adapter, "--raw")
    assert code == 0 and raw_out == default_out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    training_ids = data.prompt_token_ids(data.Example(prompt=PROMPT, completion=" x"), tokenizer)
    assert fed_ids == [training_ids, training_ids]
    assert training_ids == tokenizer(PROMPT)["input_ids"]
    code, _, _ = _generate(capsys, model_dir, "--adapter", adapter, "--chat")
    assert code == 0 and fed_ids[-1] == chat_prompt_ids(
        tokenizer, [{"role": "user", "content": PROMPT}]
    )


def test_chat_trained_adapter_gets_the_template(tmp_path, capsys, model_dir, fed_ids) -> None:
    path = tmp_path / "chats.jsonl"
    chats = [
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": a}]}
        for a in ("positive", "negative") * 4
    ]
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    adapter = _train(model_dir, path, tmp_path / "run")
    assert read_adapter_header(adapter).metadata[PROMPT_STYLE_METADATA_KEY] == "chat"
    capsys.readouterr()
    code, _, err = _generate(capsys, model_dir, "--adapter", adapter)
    assert code == 0 and "note" not in err
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = data.Example(messages=tuple(chats[0]["messages"]))
    assert fed_ids == [data.prompt_token_ids(example, tokenizer)]
    assert fed_ids[0] == chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])


def test_peft_adapter_keeps_the_template_with_a_note(tmp_path, capsys, model_dir, fed_ids):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    capsys.readouterr()
    code, _, err = _generate(capsys, model_dir, "--adapter", tmp_path / "peft")
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("lorakit: note:")]
    assert len(notes) == 1 and "chat template" in notes[0] and "--raw" in notes[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert fed_ids == [chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])]


def test_no_adapter_plain_unless_a_builtin_instruct_model_or_chat(capsys, model_dir, fed_ids):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert _generate(capsys, model_dir)[0] == 0
    assert _generate(capsys, model_dir, "--chat")[0] == 0
    chat_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])
    assert fed_ids == [tokenizer(PROMPT)["input_ids"], chat_ids]
    assert generate_command.uses_chat_template("smollm2-135m-instruct", None) is True
    assert generate_command.uses_chat_template(str(model_dir), None) is False
    assert generate_command.uses_chat_template("smollm2-135m-instruct", None, raw=True) is False
    code, _, err = run_cli(capsys, "generate", "x", "--chat", "--raw")  # contradictory
    assert code == 2 and "--raw: not allowed with argument --chat" in err


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (learned positions: 64) + the tiny tokenizer as a model directory."""
    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer = tiny_tokenizer.build()
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def long_jsonl(tmp_path):
    """Examples of ~100 tokens, longer than the tiny GPT-2's 64 positions."""
    path = tmp_path / "long.jsonl"
    record = {"prompt": "the quick brown fox jumps over the lazy dog " * 10, "completion": " ok"}
    path.write_text((json.dumps(record) + "\n") * 4)
    return path


def test_eval_refuses_max_length_past_learned_positions(capsys, gpt2_dir, long_jsonl) -> None:
    code, out, err = run_cli(capsys, "eval", "--model", gpt2_dir, "--data", long_jsonl)
    assert code == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1
    assert err == (
        "lorakit: error: --max-length 256 is longer than this model's 64 positions (a learned "
        "position table); pass --max-length 64 or less\n"
    )
    code, out, _ = run_cli(
        capsys, "eval", "--model", gpt2_dir, "--data", long_jsonl, "--max-length", "64"
    )
    assert code == 0 and json.loads(out)["truncated"] == 4


def test_train_refuses_max_length_past_learned_positions(
    tmp_path, capsys, gpt2_dir, long_jsonl
) -> None:
    code = train_cli(gpt2_dir, long_jsonl, tmp_path / "o", "--steps", "1", "--max-length", "100")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.endswith(
        "lorakit: error: --max-length 100 is longer than this model's 64 positions (a learned "
        "position table); pass --max-length 64 or less\n"
    )
    assert not (tmp_path / "o" / "adapter").exists()


def test_generate_warns_past_a_rotary_models_positions(capsys, model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "the quick brown fox jumps over the lazy dog " * 30
    tokens = len(tokenizer(prompt)["input_ids"])
    assert (
        tokens >= 300
        and AutoModelForCausalLM.from_pretrained(model_dir).config.to_dict()[
            "max_position_embeddings"
        ]
        == 128
    )
    capsys.readouterr()
    code, _, err = run_cli(
        capsys, "generate", prompt, "--model", model_dir, "--max-new-tokens", "2", "--raw"
    )
    assert code == 0
    warnings = [line for line in err.splitlines() if "max_position_embeddings" in line]
    assert warnings == [
        f"lorakit: warning: the prompt ({tokens} tokens) + --max-new-tokens 2 = {tokens + 2} "
        "tokens pass this model's max_position_embeddings 128; the text past that is likely "
        "garbage (lorakit serve refuses such a prompt): shorten the prompt or ask for fewer "
        "tokens"
    ]
    code, _, err = _generate(capsys, model_dir)
    assert code == 0 and "max_position_embeddings" not in err


def test_inspect_counts_peft_trainable_parameters_of_an_embedding_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model = tiny_models.llama()
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "emb")  # also the whole embedding matrix ("auto")
    trainable, _ = peft_model.get_nb_trainable_parameters()
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "emb", "--json")
    summary = json.loads(out)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert code == 0 and trainable == 4 * (vocab + hidden) + 2 * 4 * (64 + 64)
    assert summary["parameters"] == summary["lora_parameters"] == trainable
    assert summary["saved_base_weights"] == vocab * hidden
    assert summary["file_parameters"] == trainable + vocab * hidden
    assert summary["other_parameters"] == 0
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "emb")
    assert f"the file also holds {vocab * hidden:,} base embedding weights" in out


def test_inspect_counts_peft_trainable_parameters_with_trainable_tokens(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    peft_model = get_peft_model(tiny_models.llama(), config)
    peft_model.save_pretrained(tmp_path / "tok", save_embedding_layers=True)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "tok", "--json")
    summary = json.loads(out)
    vocab, hidden = 128, 64
    assert code == 0 and summary["parameters"] == trainable
    assert summary["saved_base_weights"] == 2 * vocab * hidden  # embed_tokens and lm_head


def test_a_loaded_adapter_keeps_its_prompt_style_when_saved_again(tmp_path):
    from lorakit.io.save import record_prompt_style, recorded_prompt_style

    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    record_prompt_style(model, "plain")
    lorakit.save_adapter(model, tmp_path / "first")
    loaded = lorakit.load_adapter(tiny_models.llama(), tmp_path / "first")
    lorakit.save_adapter(loaded, tmp_path / "again")
    for name in ("first", "again"):
        assert recorded_prompt_style(read_adapter_header(tmp_path / name).metadata) == "plain"
    with pytest.raises(ValueError, match="prompt style"):
        record_prompt_style(model, "chatty")
