"""PEFT's EVA as the tests' oracle: its ``SVDHook`` given an incremental PCA without
randomisation (``peft_svd_hooks``), and the tokens each layer's statistics hold as it runs."""

from __future__ import annotations

import warnings

import peft
import peft.tuners.lora.eva as peft_eva
import torch
from peft.utils.incremental_pca import IncrementalPCA


def _untruncated_svd(x: torch.Tensor):
    """PEFT's ``_svd_fn_full`` keeping every right singular vector (k of them, S padded with
    zeros): PEFT's incremental PCA then drops nothing between batches, so it is exact."""
    u, s, vt = torch.linalg.svd(x, full_matrices=True)
    return u[:, : s.numel()], torch.cat([s, s.new_zeros(x.shape[1] - s.numel())]), vt


def peft_svd_hooks(monkeypatch, every_component: bool) -> dict[str, int]:
    """Patch PEFT's ``SVDHook`` to a full-SVD incremental PCA; returns {layer: tokens its
    statistics hold}, filled as PEFT runs. ``every_component``: all k components in float64
    from the first batch on, so it is exact (with ``n_components=None`` alone PEFT keeps
    min(first batch's rows, k) components and is approximate afterwards)."""
    tokens: dict[str, int] = {}
    original_init, original_call = peft_eva.SVDHook.__init__, peft_eva.SVDHook.__call__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        svd = self.svd = IncrementalPCA(n_components=None, copy=True, lowrank=False)
        if not every_component:
            return
        svd._svd_fn_full = _untruncated_svd
        fit = svd.partial_fit

        def partial_fit(x, check_input=True):
            svd.n_components = x.shape[1]
            return fit(x.to(torch.float64, copy=True), check_input=False)

        svd.partial_fit = partial_fit

    def call(self, module, inputs, output):
        original_call(self, module, inputs, output)
        seen = getattr(self.svd, "n_samples_seen_", None)
        if seen is not None:
            tokens[self.name.removeprefix("base_model.model.")] = int(seen)

    monkeypatch.setattr(peft_eva.SVDHook, "__init__", init)
    monkeypatch.setattr(peft_eva.SVDHook, "__call__", call)
    return tokens


def lorakit_statistics(monkeypatch) -> dict[str, tuple]:
    """Patch ``lorakit.eva.collect_statistics`` to record, as lorakit's EVA ends, each layer
    input's (its leader's) ``(components, eigenvalues, tokens)``; returns that dict."""
    import lorakit.eva

    stats: dict[str, tuple] = {}
    original = lorakit.eva.collect_statistics

    def collect(*args, **kwargs):
        result, leader = original(*args, **kwargs)
        stats.update({name: value for name, value in result.items() if leader[name] == name})
        return result, leader

    monkeypatch.setattr(lorakit.eva, "collect_statistics", collect)
    return stats


def token_counts(stats: dict[str, tuple]) -> dict[str, int]:
    """{layer input: tokens its statistics hold} of ``lorakit_statistics``' record."""
    return {name: count for name, (_, _, count) in stats.items()}


# initialize_lora_eva_weights' arguments for a model called on a plain tensor batch
TENSOR_BATCHES = dict(
    forward_fn=lambda model, x: model(x), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None
)


def run_peft_eva(model, fields: dict, batches, eva: dict | None = None, **kwargs):
    """peft's EVA on ``model``: ``get_peft_model`` with ``LoraConfig(**fields)`` and
    ``EvaConfig(**eva)``, then ``initialize_lora_eva_weights`` over ``batches`` (``kwargs``
    passed on, e.g. ``TENSOR_BATCHES``; its warnings silenced); the PEFT model."""
    config = peft.LoraConfig(**fields, eva_config=peft.EvaConfig(**(eva or {})))
    theirs = peft.get_peft_model(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(theirs, batches, show_progress_bar=False, **kwargs)
    return theirs
