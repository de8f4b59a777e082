"""``lorakit generate``: text from a model (+ optional adapter) for a prompt."""

from __future__ import annotations

import argparse
import math
import sys

from lorakit.commands._model_options import check_base_mismatch_option, check_bnb_cpu_kernel
from lorakit.commands.eval import add_model_options
from lorakit.commands.extract import refuse_empty
from lorakit.errors import UserError

# refuse_empty's way out for an empty --adapter of eval and generate (an unset "$ADAPTER")
ADAPTER_WAY_OUT = "give an adapter directory, or leave --adapter out for the base model alone"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a model (+ adapter) for a prompt",
        description=(
            "Greedy (or sampled) generation. The prompt goes through the tokenizer's chat "
            "template, as a user message, only where the model was trained that way: an adapter "
            "lorakit train trained on chat data, or a built-in instruct model without --adapter "
            "(--chat asks for the template, --raw for none). An adapter without lorakit's record "
            "(saved by peft) gets the template when the tokenizer has one, as before, with a note."
        ),
    )
    parser.add_argument("prompt", help="the prompt text")
    add_model_options(parser, "adapter directory (PEFT format)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="most tokens to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (or below 1e-5): greedy; above: sample at this temperature (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for sampling (default: %(default)s)"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the chat template (default: only as "
        "the adapter was trained, or for a built-in instruct model)",
    )
    form.add_argument(
        "--raw", action="store_true", help="send the prompt as is, never through the chat template"
    )
    parser.set_defaults(func=run)


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    raw: bool = False,
) -> str:
    """The model's continuation of ``prompt``: sent as a user message through the tokenizer's
    chat template (``data.chat.chat_prompt_ids``) unless ``raw`` or the tokenizer has none, else
    as is (``tokenizer(prompt)``). ``lorakit generate`` decides ``raw`` by how the model was
    trained (``uses_chat_template``). Greedy by the serving engine (``engine_greedy``); sampled
    (``temperature``) by transformers' ``generate`` from the full softmax(logits / T): both
    take only the EOS ids from the model's ``generation_config`` (``_generation_config``)."""
    import torch

    from lorakit.commands._generation_config import in_place_of_models, lorakit_generation_config
    from lorakit.data.chat import chat_prompt_ids, has_chat_template
    from lorakit.serve.sampling import GREEDY_BELOW

    if not raw and has_chat_template(tokenizer):  # the prompt as training and the server see it
        ids = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])])
        encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()
    _check_length(model, len(prompt_ids), max_new_tokens)
    # below GREEDY_BELOW, logits / T overflows (softmax: NaN): greedy, as the server decodes
    if temperature < GREEDY_BELOW and isinstance(model, torch.nn.Module):
        ids = engine_greedy(model, prompt_ids, max_new_tokens)
    else:  # (the model's generation_config: only its EOS ids, as on the greedy path)
        config = lorakit_generation_config(
            model, temperature, max_new_tokens, tokenizer.pad_token_id
        )
        with torch.no_grad(), in_place_of_models(model, config):
            output = model.generate(**encoded, generation_config=config)
        ids = output[0, len(prompt_ids) :].tolist()
    return continuation_text(tokenizer, prompt_ids, ids)


def continuation_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The text of ``ids`` after ``prompt_ids`` (special tokens skipped), as ``lorakit serve``
    sends it (``serve.token_pieces.text_after``): decoded after the prompt's last tokens, so
    a SentencePiece tokenizer's first new token keeps its leading space ("low rank" -> " lo
    ...", the text after the prompt in ``decode(prompt_ids + ids)``), not the ids' decoding
    alone, which strips it."""
    from lorakit.serve.token_pieces import prompt_tail, text_after

    return text_after(tokenizer, prompt_tail(tokenizer, prompt_ids), ids)


def _check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """``UserError`` for an empty prompt, or one that with ``max_new_tokens`` passes a learned
    position table (``positions.learned_position_limit``: GPT-2's ``wpe``); a warning on stderr
    where it passes another model's ``max_position_embeddings`` (a rotary model runs on, but
    past its trained length the text is mostly garbage; ``lorakit serve`` refuses it).

    The positions used are 0 .. prompt_tokens + max_new_tokens - 2: the last new token is
    never fed back (transformers' ``generate`` and the engine alike), so a table of L rows
    takes P + N <= L + 1."""
    if prompt_tokens == 0:
        raise UserError("the prompt is empty; give some text to continue")
    from lorakit.positions import learned_position_limit, max_positions

    total = prompt_tokens + max_new_tokens
    used = total - 1  # positions fed to the model: the last new token is only sampled
    limit = learned_position_limit(model)
    if limit is not None and used > limit:
        raise UserError(
            f"the prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} is longer "
            f"than this model's {limit} positions; shorten the prompt or ask for fewer tokens"
        )
    trained = max_positions(model)
    if trained is not None and used > trained:
        print(
            f"lorakit: warning: the prompt ({prompt_tokens} tokens) + --max-new-tokens "
            f"{max_new_tokens} = {total} tokens pass this model's max_position_embeddings "
            f"{trained}; the text past that is likely garbage (lorakit serve refuses such a "
            "prompt): shorten the prompt or ask for fewer tokens",
            file=sys.stderr,
        )


def engine_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ids after ``prompt_ids`` from the serving engine's decode path (preallocated KV
    cache, last-position logits only, the lean decode step; ``lorakit.serve.engine``), one
    stream, with the model's own active adapter: served from a one-slot bank where it can be
    (``routing.own_adapter_bank``: fused q/k/v and gate/up), else added by the model's LoRA
    layers; stops at the model's EOS like ``generate``, and like it keeps that EOS as the last
    id (a decode with ``skip_special_tokens`` drops it only where it is a special token)."""
    from lorakit.serve.engine import Engine
    from lorakit.serve.requests import model_eos_token_ids
    from lorakit.serve.routing import own_adapter_bank
    from lorakit.serve.sampling import SamplingParams

    if not prompt_ids:
        raise UserError("the prompt is empty; give some text to continue")
    bank, adapter = own_adapter_bank(model) or (None, None)
    # EOS as a stop token the engine keeps in the output (its own EOS handling drops it)
    with Engine(model, bank, max_batch=1, eos_token_ids=()) as engine:
        vocab = engine.vocab_size  # (an id past it is never sampled; submit would refuse it)
        eos = tuple(t for t in model_eos_token_ids(model) if vocab is None or 0 <= t < vocab)
        params = SamplingParams(
            max_tokens=max_new_tokens, stop_token_ids=eos, include_stop_str_in_output=True
        )
        ids, _, last = engine.generate(prompt_ids, adapter, params)
    if last.finish_reason == "error":  # e.g. prompt + new tokens beyond the model's positions
        raise UserError(f"generation failed: {last.error}")
    return ids


def uses_chat_template(
    model_spec: str, adapter: str | None, *, chat: bool = False, raw: bool = False
) -> bool | None:
    """Whether ``lorakit generate`` sends its prompt through the chat template: not with
    ``raw``, yes with ``chat``; with an adapter, as it was trained (the prompt style ``lorakit
    train`` records in it, ``io.save.recorded_prompt_style``), None for one without the record
    (saved by peft: the caller keeps the old rule, the template when the tokenizer has one);
    without an adapter, for a built-in instruct model only (a plain text prompt is what a base
    model, or ``model.generate(**tokenizer(text))``, takes)."""
    from lorakit.models import BUILTIN_MODELS

    if raw or chat:
        return not raw
    if adapter:
        return _adapter_prompt_style(adapter)
    builtin = BUILTIN_MODELS.get(str(model_spec))
    return builtin is not None and not builtin.is_encoder and builtin.name.endswith("-instruct")


def _adapter_prompt_style(adapter: str) -> bool | None:
    """True / False for an adapter recording "chat" / "plain" prompts; None without a record."""
    style = recorded_prompt_style(adapter)
    return None if style is None else style == "chat"


def recorded_prompt_style(adapter: str | None) -> str | None:
    """The prompt style ("chat" or "plain") ``lorakit train`` recorded in ``adapter``
    (``io.save.recorded_prompt_style``): how ``lorakit generate`` sends its prompt and how
    ``lorakit eval`` formats built-in and CSV data when no ``--style`` is given. None without
    an adapter or a record (saved by peft; a GGUF LoRA file has none)."""
    from lorakit.io.read import read_adapter_header
    from lorakit.io.save import recorded_prompt_style as style_in

    if not adapter or adapter.endswith(".gguf"):
        return None
    return style_in(read_adapter_header(adapter).metadata)


def _prompt_is_raw(args: argparse.Namespace, tokenizer) -> bool:
    """``generate_text``'s ``raw`` for the command's flags (``uses_chat_template``); a note on
    stderr where the template is applied to an adapter that does not say how it was trained."""
    from lorakit.data.chat import has_chat_template

    template = uses_chat_template(args.model, args.adapter, chat=args.chat, raw=args.raw)
    if template and not has_chat_template(tokenizer):
        if args.chat:
            raise UserError(
                f"--chat: the tokenizer of {args.model} has no chat template; leave out --chat"
            )
        return True
    if template is None and has_chat_template(tokenizer):
        print(
            f"lorakit: note: adapter {args.adapter} does not record its training prompts' form "
            "(not saved by lorakit train), so the chat template was applied to the prompt; "
            "--raw sends it as is",
            file=sys.stderr,
        )
        return False
    return not template


def _check_seed(seed: int) -> None:
    """``UserError`` for a ``--seed`` that ``torch.manual_seed`` cannot take
    (``serve.sampling.SEED_RANGE``; its ValueError "Overflow when unpacking long long" is no
    message for a flag)."""
    from lorakit.serve.sampling import SEED_RANGE

    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"--seed must be an integer in [-2**63, 2**64 - 1], got {seed}")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or math.isinf(args.temperature):  # (nan too)
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    _check_seed(args.seed)
    import torch

    from lorakit.commands.eval import load_model_for

    refuse_empty("--adapter", args.adapter, ADAPTER_WAY_OUT)
    check_bnb_cpu_kernel(args)
    check_base_mismatch_option(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_for(args)
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        raw=_prompt_is_raw(args, tokenizer),
    )
    print(text)
    return 0
