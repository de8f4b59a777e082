"""The size of an adapter file before it is written (``lorakit plan``'s adapter file).

``save_adapter`` writes a safetensors file: 8 bytes of length, a JSON header padded to 8 bytes,
then the tensors. Besides the tensors' bytes (``P_trainable * 4`` in float32, a bfloat16
model's head copy in bfloat16 as saved by default, ``lorakit.plan_memory``; ``* 2`` in
bfloat16) the header holds per tensor ``"key":{"dtype":"F32","shape":[r,k],"data_offsets":
[begin,end]}`` and the metadata: "format", the config (``io.config_json``) and the base
fingerprint (``io.fingerprint``: per adapted module its shape, dtype, a digest and its samples,
about 470 bytes), so a header is ~0.76 KB per adapted module: Llama-2-7B, r=16 on its 224
modules, 170,600 bytes (fingerprint 106,110; 448 tensor entries, ~134 bytes each, 60,032; the
config 701). Computed here on a model whose weights may be on the meta device (no data is read):
the same JSON ``io.header.serialize`` writes, with stand-in samples of the fingerprint's size.
Exact for a float base (each tensor in the dtype the model holds it in, as saved by default: a
bfloat16 classifier's head copy "BF16" beside the float32 factors); on a quantized one about 0.45 KB per adapted module
short (its fingerprint also records a digest of the scales and the dequantized weight's
samples, ``io.quantized_fingerprint``, and the packed codes' shape and the format's name, e.g.
``bnb-nf4-dq``, where the float model planned has its weight's shape and dtype): under 0.1 MB
for SmolLM2-135M's 210 modules.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from lorakit.config import LoraConfig

__all__ = ["adapter_header_bytes", "header_bytes"]


def adapter_header_bytes(model: nn.Module, config: LoraConfig) -> tuple[int, int]:
    """Bytes of ``save_adapter``'s file besides its tensors, saved as held (the factors in
    float32, a head copy in its base dtype) and in bfloat16,
    for the adapter "default" injected (on the meta device) into ``model`` with ``config``:
    the 8-byte length and the JSON header (``io.header.serialize``, padded to 8 bytes) holding
    per tensor ``"key":{"dtype":"F32","shape":[r,k],"data_offsets":[begin,end]}`` and the
    metadata: "format", the config (``io.config_json``) and the base fingerprint
    (``io.fingerprint``: per adapted module its shape, dtype, a 32-hex digest and its 64
    samples' float32 bytes in base64, ~470 bytes)."""
    from lorakit.io import fingerprint, fingerprint_json
    from lorakit.io.config_json import config_to_json
    from lorakit.io.file_tensors import model_tensor
    from lorakit.io.keys import written_key
    from lorakit.io.read import CONFIG_METADATA_KEY
    from lorakit.io.save import adapter_file_entries

    entries, lora_names = adapter_file_entries(model, "default", [])
    tensors = {written_key(entry.key): model_tensor(model, entry, "default") for entry in entries}
    shapes = {key: list(tensor.shape) for key, tensor in tensors.items()}
    as_held = {
        key: _SAFETENSORS_CODES.get(tensor.dtype, ("F32", 4)) for key, tensor in tensors.items()
    }
    layers = {name: model.get_submodule(name) for name in lora_names}
    fingerprints = {name: _fingerprint_stand_in(layer) for name, layer in layers.items()}
    bases = [layer.base_layer for layer in layers.values()]
    metadata = {
        "format": "pt",
        fingerprint.METADATA_KEY: fingerprint_json.to_metadata(fingerprints),
        CONFIG_METADATA_KEY: config_to_json(model, config, bases),
    }
    return header_bytes(shapes, metadata, as_held), header_bytes(shapes, metadata, "BF16", 2)


_SAFETENSORS_CODES = {
    torch.float32: ("F32", 4),
    torch.bfloat16: ("BF16", 2),
    torch.float16: ("F16", 2),
    torch.float64: ("F64", 8),
}
"""A float tensor's dtype as safetensors writes it in a header, and its bytes an element."""


def _fingerprint_stand_in(layer: nn.Module) -> dict[str, object]:
    """A fingerprint entry of the size ``io.fingerprint.compute`` writes for ``layer``'s base
    weight (its shape and dtype; zeros stand in for the samples a meta weight does not have)."""
    from lorakit.io import fingerprint

    weight, dtype_name = fingerprint.base_identity(layer)
    samples = torch.zeros(min(fingerprint.SAMPLES, weight.numel()))
    return fingerprint.weight_fingerprint(samples, dtype_name) | {"shape": list(weight.shape)}


def header_bytes(
    shapes: dict[str, list[int]],
    metadata: dict[str, str],
    code: str | dict[str, tuple[str, int]],
    itemsize: int = 0,
) -> int:
    """8 + the padded JSON header of a safetensors file of ``shapes`` (tensors laid out by key)
    and ``metadata`` (sorted keys): every tensor in one dtype (``code``, ``itemsize`` bytes an
    element), or each in its own (``code``: ``{key: (code, itemsize)}``)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in sorted(shapes):
        key_code, key_itemsize = code[key] if isinstance(code, dict) else (code, itemsize)
        size = key_itemsize * math.prod(shapes[key])
        header[key] = {
            "dtype": key_code,
            "shape": shapes[key],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + -len(text) % 8
