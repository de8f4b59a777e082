"""Running lorakit's GGUF files in llama.cpp through ``llama-cpp-python`` (imported only here).

llama-cpp-python 0.3.36 built on an AVX-512 + AMX CPU crashes (SIGSEGV) in any batch of more
than one token on a Q4_1 model while llama.cpp's CPU weight repacking ("extra buffer types",
llama-cli's ``--no-repack`` turns it off) is on, its default; ``Llama(...)`` does not pass that
setting through, so ``weight_repacking(False)`` sets it for the models loaded inside.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def weight_repacking(allowed: bool):
    """Models loaded inside have llama.cpp's ``use_extra_bufts`` set to ``allowed``
    (llama-cpp-python does not pass it through, so its default-params function is wrapped)."""
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = allowed
        return params

    low.llama_model_default_params = default_params
    try:
        yield
    finally:
        low.llama_model_default_params = original
