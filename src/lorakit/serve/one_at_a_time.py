"""Models the engine serves one request at a time, and the few it refuses; decided when the
``Engine`` is built, from the model alone (``serving_plan``).

- A model whose cache layers ``concatenated_cache`` cannot join (``DynamicCache(config=...)``
  builds a layer type outside ``JOINABLE_LAYERS``: GLM-MoE-DSA's and DeepSeek-V3.2's
  ``DynamicIndexedLayer``): the engine's own prefill and decode step, with one running request
  (``max_batch`` 1; the others wait in the queue). Their joins once failed every request that
  arrived while another ran.
- A model whose recurrent state is not a joinable ``DynamicCache`` returned as ``cache``
  (``CARRIED_STATE``): also one at a time, and ``SoloDecoder`` carries the state between its
  forwards as transformers' ``generate`` does. RWKV: ``state`` in, ``state`` out; MiniMax: its
  own ``MiniMaxCache`` (refuses another), returned as ``cache``; RecurrentGemma: the
  ``DynamicCache`` passed in, filled in place, not returned. Their requests once all failed
  with an AttributeError.
- ``REFUSED``: xLSTM (transformers' own ``generate`` fails on its ``xLSTMCache`` in this
  version): ``UnservableModelError`` when the engine is built, not a failure per request.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.errors import UserError
from lorakit.serve.concatenated_cache import JOINABLE_LAYERS

__all__ = ["CARRIED_STATE", "REFUSED", "SoloDecoder", "UnservableModelError", "serving_plan"]

CARRIED_STATE = {"rwkv": "state", "minimax": "returned cache", "recurrent_gemma": "passed cache"}
"""model_type -> how its state goes from one forward to the next (the module docstring)."""

REFUSED = {
    "xlstm": "its recurrent state (transformers' xLSTMCache) cannot be carried between the "
    "engine's forwards",
}


class UnservableModelError(UserError, ValueError):
    """A model the engine cannot serve (``REFUSED``); the CLI prints it as one line."""


def serving_plan(model: nn.Module) -> tuple[str | None, SoloDecoder | None]:
    """(why requests of ``model`` must run one at a time, or None; the ``SoloDecoder`` its
    decode steps need, or None: the engine's own). ``UnservableModelError`` for ``REFUSED``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnservableModelError(
            f"lorakit cannot serve a {model_type!r} model: {REFUSED[model_type]}. Merge the "
            "adapter into the model (lorakit merge) and generate with transformers instead"
        )
    if model_type in CARRIED_STATE:
        reason = f"its recurrent state ({CARRIED_STATE[model_type]}) is not a joinable cache"
        return reason, SoloDecoder(model, CARRIED_STATE[model_type])
    layer = unjoinable_cache_layer(config)
    if layer is not None:
        return f"its cache layers ({layer}) cannot join a running batch", None
    return None, None


def unjoinable_cache_layer(config) -> str | None:
    """The name of the first layer type of ``DynamicCache(config=config)`` outside
    ``JOINABLE_LAYERS`` (None: all joinable, or no config the cache can read)."""
    if config is None or not hasattr(config, "get_text_config"):
        return None
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: the model builds its own, as before
        return None
    for layer in layers:
        if type(layer) not in JOINABLE_LAYERS:
            return type(layer).__name__
    return None


class SoloDecoder:
    """One request's forwards with the model's own recurrent state carried between them:
    ``prefill(ids)`` starts a request, ``step(last)`` feeds its newest token. Positions (where
    the forward takes them) are 0 .. P - 1 for the prompt, then P, P + 1, ...: those of
    ``generate`` on one unpadded sequence."""

    def __init__(self, model: nn.Module, carry: str) -> None:
        self.model, self.carry = model, carry
        accepts = inspect.signature(model.forward).parameters
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._positions = "position_ids" in accepts
        self._state = None
        self._length = 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Run the prompt ``ids`` (a fresh state); the last position's logits (vocab,)."""
        options = dict(self._last_logits)
        self._state = None
        if self.carry == "passed cache":
            self._state = options["cache"] = DynamicCache(config=self.model.config)
        output = self.model(input_ids=torch.tensor([ids]), use_cache=True, **options)
        self._keep(output)
        self._length = len(ids)
        return output.logits[0, -1]

    def step(self, last: torch.Tensor) -> torch.Tensor:
        """Feed ``last`` (1, 1), the newest token; its logits (1, vocab)."""
        options = {"state" if self.carry == "state" else "cache": self._state}
        if self._positions:
            options["position_ids"] = torch.tensor([[self._length]])
        output = self.model(input_ids=last, use_cache=True, **options)
        self._keep(output)
        self._length += 1
        return output.logits[:, -1]

    def clear(self) -> None:
        """The request left: drop its state (its memory goes back)."""
        self._state = None

    def _keep(self, output) -> None:
        if self.carry == "state":
            self._state = output.state
        elif self.carry == "returned cache":
            self._state = output.cache
