"""How long a sequence a transformers model takes: its configured maximum, and whether that is a
hard limit (a learned absolute position table) or not (rotary models may run past it)."""

from __future__ import annotations

from torch import nn

from lorakit.errors import UserError

__all__ = ["check_max_length", "learned_position_limit", "max_positions"]


def max_positions(model: nn.Module) -> int | None:
    """The config's ``max_position_embeddings`` (or GPT-2's ``n_positions``); None without one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def learned_position_limit(model: nn.Module) -> int | None:
    """The rows of the model's learned absolute position table (GPT-2's ``wpe``, BERT's
    ``position_embeddings``: an embedding other than the input one with the config's maximum
    positions as rows, past any rows it keeps before position 0: OPT's and BioGPT's tables have
    ``offset`` = 2 more), which no sequence may pass; None for a model without one (rotary
    models may run past their configured maximum)."""
    if not isinstance(model, nn.Module):  # (e.g. a stand-in that only generates)
        return None
    limit = max_positions(model)
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    tables = [
        module
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        and module is not inputs
        and module.num_embeddings - getattr(module, "offset", 0) == limit
    ]
    return limit if tables else None


def check_max_length(model: nn.Module, max_length: int, flag: str = "--max-length") -> None:
    """``UserError`` naming ``flag`` when ``max_length`` tokens per example pass the model's
    learned position table (``learned_position_limit``): an example that long would index past
    the table's rows. Rotary models are not limited."""
    limit = learned_position_limit(model)
    if limit is not None and max_length > limit:
        raise UserError(
            f"{flag} {max_length} is longer than this model's {limit} positions (a learned "
            f"position table); pass {flag} {limit} or less"
        )
