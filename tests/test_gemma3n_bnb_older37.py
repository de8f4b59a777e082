"""An older lorakit's bitsandbytes Gemma3n adapter on the AltUp coefficients, which lorakit now
puts back in float after a bitsandbytes load (99c6979), is refused with the reason (session 37's
regression review B, finding 3): its fingerprint fit (the float weight is the dequantized one),
so it loaded with other outputs (0.015 on the reviewer's model)."""

from __future__ import annotations

import json

import pytest
from torch import nn

import lorakit
from lorakit.errors import BaseModelMismatchError
from lorakit.models import load_model
from tests import tiny_tokenizer


def _as_an_older_lorakit_saved_it(directory) -> list[str]:
    """The adapter's base fingerprint with each AltUp coefficient layer's entry as an older
    lorakit wrote it on bitsandbytes int8, where that layer was a ``Linear8bitLt``: format
    ``"bnb-int8"``, its dequantized weight's samples (the float weight lorakit now puts back:
    equal to them). Returns those layers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata())
    fingerprint = json.loads(metadata["lorakit.base_fingerprint"])
    layers = [name for name in fingerprint["modules"] if name.endswith("_coefs")]
    for name in layers:
        entry = fingerprint["modules"][name]
        dequantized = {"shape": entry["shape"], "values": entry["values"]}
        entry |= {"dtype": "bnb-int8", "dequantized": dequantized}
    metadata["lorakit.base_fingerprint"] = json.dumps(fingerprint)
    save_file(load_file(path), path, metadata=metadata)
    return layers


def test_an_older_bnb_adapter_on_the_altup_coefficients_is_refused_with_the_reason(tmp_path):
    """Before: the fingerprint fit (the float weight is the dequantized one) and the adapter
    loaded with other outputs (0.015 on the reviewer's model). Now: refused, naming the layer
    and why it is float; loaded anyway on request, with the note as a warning."""
    pytest.importorskip("bitsandbytes")
    from tests.test_gemma3n_review37 import GEMMA3N
    from tests.test_gemma3n_review37 import _model as gemma3n_model

    gemma3n_model(**GEMMA3N).save_pretrained(tmp_path / "base")
    tiny_tokenizer.build().save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base", quantization="int8", progress=False)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["prediction_coefs", "q_proj"])
    lorakit.inject(model, config)
    lorakit.save_adapter(model, tmp_path / "adapter")
    layers = _as_an_older_lorakit_saved_it(tmp_path / "adapter")
    fresh, _ = load_model(tmp_path / "base", quantization="int8", progress=False)
    assert type(fresh.get_submodule(layers[0])) is nn.Linear  # (float here)
    with pytest.raises(BaseModelMismatchError) as caught:
        lorakit.load_adapter(fresh, tmp_path / "adapter")
    message = str(caught.value)
    assert f"module {layers[0]!r}" in message and "bnb-int8 layer, here float" in message
    assert f"lorakit now puts {layers[0]} back in float after a bitsandbytes load" in message
    assert all(type(m).__name__ != "LoraLinear" for m in fresh.modules())  # (unchanged)
    with pytest.warns(UserWarning, match="back in float after a bitsandbytes load"):
        lorakit.load_adapter(fresh, tmp_path / "adapter", allow_base_mismatch=True)
