"""The settings of ``lorakit train``, each spelled once, as a dataclass field with its help text.

``TrainSettings`` holds what the command needs besides the loop: the model, the data, the LoRA
adapter, the example length and ``resume``; ``TrainingConfig`` holds the loop's settings. Every
``setting(...)`` field of the two is an option (see ``lorakit.train.config.setting``); its
*key* is its flag without dashes (``--output`` -> ``output``), the name used by the config file
and by ``train_settings.json`` (which is therefore a valid config file). ``lorakit.commands.train``
builds the parser from these fields; nothing here knows argparse.
"""

from __future__ import annotations

from dataclasses import Field, dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.quantization_names import TRAINABLE_QUANTIZATIONS
from lorakit.train.config import (
    SettingError,
    TrainingConfig,
    flag_name,
    setting,
    setting_fields,
    setting_key,
    setting_kind,
)

__all__ = [
    "LORA_FLAGS",
    "TrainSettings",
    "build_settings",
    "load_examples_for",
    "option_fields",
    "option_kind",
    "setting_defaults",
]


MAX_RANK = 2**16
"""The largest ``--r``: the update ``B A`` of a layer has rank at most its smaller side
(``min(in, out)``), and no model's layers are that wide (Llama-3-405B's hidden size is 16384),
so a larger rank is a typo; refused before the meta-device injection that would fail on it
(past 2**63, with torch's C++ frames) or the allocation that would (a rank of 10**15)."""


@dataclass
class TrainSettings:
    """What ``lorakit train`` takes besides ``TrainingConfig``."""

    model: str = setting(
        "smollm2-135m-instruct",
        "model spec: a local transformers directory or a built-in name (a causal LM)",
    )
    data: str | None = setting(
        None,
        "training data: rotten-tomatoes, chatterbot, a .jsonl or a .csv file "
        "(required, here or in --config)",
    )
    split: str | None = setting(
        None,
        "split of --data: train/validation/test/all (default: train for built-ins, all rows of "
        "a file)",
    )
    eval_data: str | None = setting(
        None, "evaluation data, a spec as for --data (default: no evaluation)"
    )
    eval_split: str | None = setting(
        None,
        "split of --eval-data (default: validation for built-ins, all rows of a file)",
    )
    style: str | None = setting(
        None,
        "chat (the chat template) or plain (prompt/completion) for built-ins and CSV; the "
        "adapter records it and lorakit generate and eval format prompts the same way "
        "(default: chat for built-ins, plain for CSV)",
        choices=("chat", "plain"),
    )
    target_modules: str | list[str] = setting(
        "all-linear", "comma-separated module names, or all-linear"
    )
    r: int = setting(
        16,
        "LoRA rank; also --rank, the spelling to use under torchrun (whose parser reads --r as "
        "an abbreviation of its own options on Python < 3.12)",
        aliases=("--rank",),
    )
    alpha: float = setting(32.0, "lora_alpha (scaling = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input")
    use_dora: bool = setting(
        False, "DoRA: also train a magnitude per output feature (PEFT's use_dora=True)"
    )
    lora_bias: bool = setting(
        False, "a trainable bias on lora_B, merged into the base bias (PEFT's lora_bias=True)"
    )
    trainable_token_indices: str | list[int] | None = setting(
        None,
        "comma-separated token ids whose rows of the input embedding train in full, saved as "
        "PEFT's trainable_tokens_delta (PEFT's trainable_token_indices; a list in --config) "
        "(default: none)",
    )
    max_length: int = setting(
        256,
        "maximum tokens per example: longer reviews (classification data) are shortened inside "
        "the template, other examples lose their start; at most the model's positions for a "
        "learned position table such as GPT-2's",
    )
    resume: bool = setting(
        False, "continue from the newest checkpoint in --output (refused where there is none)"
    )
    quantization: str | None = setting(
        None,
        "train on a quantized frozen base: nf4, fp4, int8 (bitsandbytes, on the CPU) or gguf "
        "(the built-in model's own GGUF blocks); see docs/quantized.md (default: float)",
        choices=TRAINABLE_QUANTIZATIONS,
    )
    dtype: str = setting(
        "float32",
        "dtype of the frozen base's weights and compute: bfloat16 halves the base's memory and, "
        "on CPUs with AVX512-BF16 or AMX (and GPUs), runs its matmuls several times faster; the "
        "adapter, its gradients, the optimizer and the loss stay float32 (float16 is refused: "
        "the loop does no loss scaling)",
        choices=("float32", "bfloat16", "float16"),
    )
    device: str = setting(
        "auto",
        "where to train: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N; "
        "under torchrun each process takes the GPU of its LOCAL_RANK",
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("no training data: give --data SPEC (or 'data:' in the config file)")
        if isinstance(self.r, int) and self.r > MAX_RANK:  # (not an int, or < 1: LoraConfig)
            raise SettingError(
                "r",
                f"must be at most {MAX_RANK} (a layer's update B A has rank at most the layer's "
                f"smaller dimension), got {self.r}",
            )
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise SettingError("max_length", f"must be an integer >= 2, got {self.max_length!r}")
        if self.dtype == "float16":
            raise SettingError(
                "dtype",
                "float16 is not trained: lorakit's loop does no loss scaling, and the gradients "
                "flowing through a float16 base underflow (40% off on a batch of 8k tokens); use "
                "bfloat16 (the same memory, float32's range) or float32",
            )

    def lora_config(self):
        """The ``LoraConfig`` of ``r``, ``alpha``, ``dropout``, ``use_dora``, ``lora_bias``,
        ``trainable_token_indices`` and ``target_modules``.
        ``task_type`` CAUSAL_LM lets peft's ``AutoPeftModelForCausalLM`` open the adapter; the
        base is recorded as the user gave it (a built-in's name, not its cache path; a local
        directory as written, ``~`` expanded: ``model_specs.recorded_spec``)."""
        from lorakit import LoraConfig
        from lorakit.model_specs import recorded_spec

        try:
            return LoraConfig(
                r=self.r,
                lora_alpha=self.alpha,
                lora_dropout=self.dropout,
                use_dora=self.use_dora,
                lora_bias=self.lora_bias,
                trainable_token_indices=self._token_ids(),
                target_modules=self.target_modules,
                task_type="CAUSAL_LM",
                base_model_name_or_path=recorded_spec(self.model),
            )
        except (ValueError, TypeError) as error:
            raise UserError(f"invalid LoRA settings: {with_lora_flags(str(error))}") from None

    def _token_ids(self) -> list[int] | None:
        """``trainable_token_indices`` as a list of ints ("5,7" from a flag, [5, 7] from a
        file); a ``UserError`` naming the value if one is not an integer."""
        given = self.trainable_token_indices
        if given is None or isinstance(given, list):
            return given
        try:
            return [int(part) for part in str(given).split(",")]
        except ValueError:
            raise UserError(
                f"--trainable-token-indices takes comma-separated token ids (e.g. 5,17,42), "
                f"got {given!r}"
            ) from None


LORA_FLAGS = {
    "r": "--r",
    "lora_alpha": "--alpha",
    "lora_dropout": "--dropout",
    "use_dora": "--use-dora",
    "lora_bias": "--lora-bias",
    "trainable_token_indices": "--trainable-token-indices",
    "target_modules": "--target-modules",
}
"""The ``lorakit train`` flag of each ``LoraConfig`` field that ``TrainSettings.lora_config``
sets (for messages: ``LoraConfig.lora_alpha`` is ``--alpha`` to the user)."""


def with_lora_flags(message: str) -> str:
    """``LoraConfig``'s ``message`` with ``LoraConfig.<field>=<value>`` written as the field's
    flag and value (``LoraConfig.r=0 is invalid`` -> ``--r 0 is invalid``)."""
    for name, flag in LORA_FLAGS.items():
        message = message.replace(f"LoraConfig.{name}=", f"{flag} ")
    return message


def option_fields() -> list[Field]:
    """Every option of ``lorakit train``: the ``setting`` fields of both dataclasses."""
    return [*setting_fields(TrainSettings), *setting_fields(TrainingConfig)]


def option_kind(option: Field) -> type:
    """The type of an option's value (``int``, ``float``, ``bool``, ``str``, ...)."""
    owner = TrainSettings if option in setting_fields(TrainSettings) else TrainingConfig
    return setting_kind(owner, option)


def setting_defaults() -> dict[str, Any]:
    """``{key: default}`` of every option (a negated bool's key defaults to False)."""
    return {
        setting_key(f): (False if f.metadata["negated"] else f.default) for f in option_fields()
    }


def flag_of(name: str) -> str:
    """The flag of the option whose field is ``name`` (for messages)."""
    return next(flag_name(f) for f in option_fields() if f.name == name)


def build_settings(values: dict[str, Any]) -> tuple[TrainSettings, TrainingConfig]:
    """The two dataclasses of ``values`` (by key). A bad value raises a ``UserError`` naming its
    flag (``--warmup-ratio must be in [0, 1], got -1.0``)."""
    built = {}
    try:
        for cls in (TrainSettings, TrainingConfig):
            arguments = {}
            for option in setting_fields(cls):
                value = values[setting_key(option)]
                if setting_kind(cls, option) is bool:
                    value = bool(value) != option.metadata["negated"]
                arguments[option.name] = value
            built[cls] = cls(**arguments)
    except SettingError as error:
        raise UserError(f"{flag_of(error.setting)} {error.problem}") from None
    training = built[TrainingConfig]
    output = Path(training.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory (new or existing)")
    from lorakit.model_specs import refuse_output_in_model_store

    refuse_output_in_model_store("train", output)  # (the built-in base's own directory)
    return built[TrainSettings], training


def load_examples_for(spec: str, split: str | None, style: str | None, default_split: str):
    """Examples of ``spec``: built-in datasets default to ``default_split``, files to all rows.

    ``style`` (``--style``) goes to built-ins and CSV files only: a JSONL file says its own form
    (prompt/completion or messages), so one ``--style`` serves ``--data`` and ``--eval-data``
    (a built-in in plain style evaluated on one's own JSONL file)."""
    from lorakit import data

    if split is None and spec in data.BUILTIN_DATASETS:
        split = default_split
    if Path(spec).suffix.lower() == ".jsonl":
        style = None
    examples = data.load_examples(spec, split, style=style)
    if not examples:
        raise UserError(f"data '{spec}' (split {split or 'all'}) holds no examples")
    return examples
