"""The ``GenerationConfig`` that ``lorakit generate`` hands transformers' ``generate`` (its
sampled path, ``--temperature T``), built from lorakit's own settings alone.

``lorakit generate`` samples as ``lorakit serve`` does, from the full softmax(logits / T), and
takes from the model's ``generation_config`` (a checkpoint's ``generation_config.json``) only
what the greedy path (the serving engine, ``generate.engine_greedy``) takes too: the EOS ids,
where generation stops. Everything else there is ignored on both paths, since the engine has
none of it: sampling cutoffs (``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``top_h``,
``epsilon_cutoff``, ``eta_cutoff``) and its ``temperature``; penalties and token rules
(``repetition_penalty``, ``no_repeat_ngram_size``, ``suppress_tokens``,
``begin_suppress_tokens``, ``bad_words_ids``, ``sequence_bias``, ``min_length``,
``min_new_tokens``, forced BOS / EOS, ``exponential_decay_length_penalty``,
``renormalize_logits``); stopping rules other than EOS (``max_length``, ``stop_strings``,
``max_time``); beams, several sequences and dict outputs.

transformers fills every field a passed config leaves None from ``model.generation_config`` and
then from its global defaults (``top_k=50``), and a field whose neutral value is None
(``top_h``, ``suppress_tokens``, ``forced_bos_token_id``, ...) cannot be set to it in the
passed config. So for the call the model's own config is this one (``in_place_of_models``), and
what the merge then fills comes from the global defaults alone (``top_k`` set to 0 here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import GenerationConfig

__all__ = ["KEPT_FROM_MODEL", "in_place_of_models", "lorakit_generation_config"]

KEPT_FROM_MODEL = ("eos_token_id", "bos_token_id", "pad_token_id")
"""The fields of the model's ``generation_config`` that are kept (the pad id is the
tokenizer's where it has one; BOS matters only without a prompt, which is refused)."""


def lorakit_generation_config(
    model, temperature: float, max_new_tokens: int, pad_token_id: int | None = None
) -> GenerationConfig:
    """``max_new_tokens`` tokens sampled from softmax(logits / ``temperature``) over the whole
    vocabulary (no cutoff, no penalty, no other processor), stopping at the model's EOS; greedy
    where ``temperature`` is below ``serve.sampling.GREEDY_BELOW`` (the CLI's greedy path runs
    the engine; this is for a model that is no torch module)."""
    from lorakit.serve.sampling import GREEDY_BELOW

    own = getattr(model, "generation_config", None)
    fields = {name: getattr(own, name, None) for name in KEPT_FROM_MODEL}
    if pad_token_id is not None:
        fields["pad_token_id"] = pad_token_id
    if temperature >= GREEDY_BELOW:
        fields.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        fields.update(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, **fields)


@contextlib.contextmanager
def in_place_of_models(model, config: GenerationConfig) -> Iterator[None]:
    """Within the block, ``model.generation_config`` is ``config`` (the model's own is put back
    after, also on an error), so that ``model.generate(generation_config=config)`` fills nothing
    from the model's; a model without one (a stand-in) is left as it is."""
    if not hasattr(model, "generation_config"):
        yield
        return
    own = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = own
