"""The names of the quantized bases lorakit loads, in a module that imports nothing heavy, so
the command-line parsers (``lorakit --help``) can offer them without importing torch.

``lorakit.quantized.loading`` loads each of them; ``docs/quantized.md`` describes them.
"""

QUANTIZATIONS = ("nf4", "fp4", "int8", "gguf", "int8-rows", "int4-groups")
TRAINABLE_QUANTIZATIONS = ("nf4", "fp4", "int8", "gguf")  # train / demo (the others: inference)
