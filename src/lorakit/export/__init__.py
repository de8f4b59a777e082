"""Export to llama.cpp / Ollama's GGUF format, and read GGUF LoRA adapters back.

- ``gguf_names``: which transformers architectures map to which GGUF architecture, the GGUF
  tensor name of each module, and the q/k row order llama.cpp's converter uses for Llama.
- ``gguf_adapter``: a PEFT-format adapter -> a GGUF LoRA adapter file (scales folded so the file
  is exact under llama.cpp's ``scale = alpha / rank``).
- ``gguf_read``: a GGUF LoRA adapter -> lorakit (``load_adapter`` on a ``.gguf`` path, ``inspect``).
- ``gguf_model``: a model (optionally merged with an adapter) -> a full GGUF model file.

The ``gguf`` package is imported inside these modules only; nothing else in lorakit needs it.
Facts and checks: docs/gguf.md.
"""
