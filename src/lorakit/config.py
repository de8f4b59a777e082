"""``LoraConfig``: what to adapt and how, with PEFT's field names and meanings.

The fields round-trip through PEFT's ``adapter_config.json`` (see ``lorakit.io``). Invalid
values raise ``ValueError`` at construction, naming the field and the value; so do regexes that
could take unbounded time to match (``lorakit.patterns``: configs are untrusted input).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.init_methods import EvaConfig, LoftQConfig, changes_base
from lorakit.patterns import check_pattern, check_pattern_set, compiled, shown

__all__ = ["ALL_LINEAR", "LoraConfig", "TaskType"]

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "eva")


class TaskType(str, enum.Enum):
    """PEFT's task types; only ``SEQ_CLS`` changes behaviour (the head is trained in full)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (PEFT-compatible field names).

    ``h = W0 x + s B A x`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
    """

    r: int = 8
    """Rank of the update (A is r x k, B is d x r)."""
    lora_alpha: float = 8
    """Numerator of the scaling ``s``."""
    target_modules: str | list[str] | None = None
    """A string is a regex matched against the WHOLE module name; a list matches names equal to
    an entry or ending in ``"." + entry`` (``inject`` refuses an entry that matches no module);
    ``"all-linear"`` is every Linear/Conv1D except the output embedding (and, for ``SEQ_CLS``,
    the classification head)."""
    target_parameters: list[str] | None = None
    """Bare ``nn.Parameter``s to adapt (PEFT's): a parameter ``<module>.<name>`` is taken when
    it equals an entry or ends in ``"." + entry`` (e.g. ``"experts.gate_up_proj"``, the fused
    (E, d, k) expert weights of a transformers MoE layer); 2-D and 3-D parameters
    (``lorakit.layers.parameter``). With it, an unset ``target_modules`` adapts the default
    modules of the model type if lorakit has a default for it, else none (PEFT's rule; write
    ``target_modules=[]`` for parameters only).
    Not with dropout, DoRA, ``lora_bias``, ``fan_in_fan_out`` or an init other than True,
    False or "gaussian" (PEFT's rules)."""
    exclude_modules: str | list[str] | None = None
    """Same matching rules as ``target_modules``; matching modules are never adapted."""
    lora_dropout: float = 0.0
    """Dropout probability on the input of A, in [0, 1)."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias of the model) or "lora_only" (adapted layers)."""
    fan_in_fan_out: bool = False
    """Base weight stored (in, out). Detected automatically for transformers' Conv1D."""
    use_rslora: bool = False
    """Scale by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output feature rescales each row of ``W0 + s B A``
    (``lorakit.functional``); nn.Linear and Conv1D layers only (embeddings are refused)."""
    lora_bias: bool = False
    """A trainable bias ``b`` (d,) on B: the branch is ``s (B A x + b)`` and merging adds ``s b``
    to the base bias (PEFT's ``lora_bias``; nn.Linear and Conv1D layers; not with DoRA or
    ``init_lora_weights="gaussian"``, as in PEFT). Saved as ``<module>.lora_B.bias``."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Rows of an embedding trained in full (PEFT's): a list of token ids for the input
    embedding, or ``{module name suffix: token ids}``; saved as
    ``<embedding>.token_adapter.trainable_tokens_delta`` (n, dim), the rows' new values."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: key matches name m when ``re.match(rf"(.*\\.)?({key})$", m)``; first wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, matched like ``rank_pattern``."""
    layers_to_transform: int | list[int] | None = None
    """Only adapt these layer indices (needs a list ``target_modules``)."""
    layers_pattern: str | list[str] | None = None
    """Name of the layer container (e.g. "layers", "h") holding the indexed layers."""
    modules_to_save: list[str] | None = None
    layer_replication: list[list[int]] | None = None
    """PEFT's: ``[[start, end), ...]`` ranges of decoder layers stacked into a new, longer
    layer list whose copies share the base weights, each copy adapted on its own
    (``lorakit.replication``); e.g. ``[[0, 2], [1, 2]]`` turns layers 0, 1 into 0, 1, 1."""
    """Modules trained and saved in full (e.g. a classification head)."""
    init_lora_weights: bool | str = True
    """True: Kaiming-uniform A, zero B. "gaussian": normal A (std 1/r), zero B. False: random B.
    "pissa", "pissa_niter_K" (K an integer), "olora" and "loftq" take A and B from the base weight and
    overwrite the base with the rest (``lorakit.init_methods``); "eva": zero B, A set from
    layer inputs by ``lorakit.eva.initialize_lora_eva_weights``."""
    eva_config: EvaConfig | None = None
    """EVA's settings (``init_lora_weights="eva"``); None: the defaults."""
    loftq_config: LoftQConfig | None = None
    """LoftQ's settings (``init_lora_weights="loftq"``); None: the defaults."""
    task_type: str | None = None
    """PEFT task type, e.g. "CAUSAL_LM" or "SEQ_CLS"."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; informational, written to adapter_config.json."""

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.eva_config, dict):
            self.eva_config = EvaConfig(**self.eva_config)
        if isinstance(self.loftq_config, dict):
            self.loftq_config = LoftQConfig(**self.loftq_config) if self.loftq_config else None
        _check(
            self.loftq_config is None or isinstance(self.loftq_config, LoftQConfig),
            "loftq_config",
            self.loftq_config,
            "None or a lorakit.LoftQConfig",
        )
        _check(
            self.eva_config is None or isinstance(self.eva_config, EvaConfig),
            "eva_config",
            self.eva_config,
            "None or a lorakit.EvaConfig",
        )
        self._validate()

    def _validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is not valid, and why."""
        self._validate_kinds()  # first: the patterns read below must be dicts
        self._validate_numbers()
        self._validate_init()
        for name in ("target_modules", "exclude_modules"):
            _check_name_spec(name, getattr(self, name))
        _check_token_indices(self.trainable_token_indices)
        self._validate_target_parameters()
        self._validate_layer_replication()
        self._validate_layer_selection()

    def _validate_numbers(self) -> None:
        """r, lora_alpha, lora_dropout, and the per-module ranks and alphas."""
        _check(_is_positive_int(self.r), "r", self.r, "a positive integer")
        _check(_is_positive_number(self.lora_alpha), "lora_alpha", self.lora_alpha, POSITIVE)
        _check(
            _is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
            "lora_dropout",
            self.lora_dropout,
            "a probability in [0, 1)",
        )
        for key, rank in self.rank_pattern.items():
            _check(_is_positive_int(rank), f"rank_pattern[{key!r}]", rank, "a positive integer")
        for key, alpha in self.alpha_pattern.items():
            _check(_is_positive_number(alpha), f"alpha_pattern[{key!r}]", alpha, POSITIVE)
        for name in ("rank_pattern", "alpha_pattern"):
            check_pattern_set(f"LoraConfig.{name}", list(getattr(self, name)))

    def _validate_kinds(self) -> None:
        """The fields that take one of a few values or types."""
        _check(self.bias in BIAS_MODES, "bias", self.bias, f"one of {BIAS_MODES}")
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            _check(
                isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "True or False"
            )
        tasks = [task.value for task in TaskType]
        _check(
            self.task_type is None or self.task_type in tasks,
            "task_type",
            self.task_type,
            f"None or one of {tasks}",
        )
        _check(
            self.modules_to_save is None
            or (
                isinstance(self.modules_to_save, list)
                and all(isinstance(n, str) and n for n in self.modules_to_save)
            ),
            "modules_to_save",
            self.modules_to_save,
            'None or a list of module names (e.g. ["classifier"], not "classifier")',
        )
        _check(
            self.base_model_name_or_path is None or isinstance(self.base_model_name_or_path, str),
            "base_model_name_or_path",
            self.base_model_name_or_path,
            "None or a string",
        )
        for pattern in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, pattern)
            _check(isinstance(value, dict), pattern, value, "a dict {regex: value}")

    def _validate_init(self) -> None:
        """init_lora_weights, and what it cannot go with (DoRA; a bias on B)."""
        _check(
            any(
                self.init_lora_weights is mode or self.init_lora_weights == mode
                for mode in INIT_MODES
            )
            or changes_base(self.init_lora_weights),
            "init_lora_weights",
            self.init_lora_weights,
            'True, False, "gaussian", "pissa", "pissa_niter_K" (K an integer), "olora", "loftq" '
            'or "eva"',
        )
        if self.use_dora and changes_base(self.init_lora_weights):
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} with use_dora=True is "
                "not implemented in lorakit; use one of them."
            )
        _check(
            not self.lora_bias or (not self.use_dora and self.init_lora_weights in (True, False)),
            "lora_bias",
            self.lora_bias,
            "False with use_dora=True or an init_lora_weights other than True/False (PEFT's rule)",
        )

    def _validate_layer_replication(self) -> None:
        ranges = self.layer_replication
        if isinstance(ranges, (list, tuple)):
            ranges = self.layer_replication = [
                list(pair) if isinstance(pair, (list, tuple)) else pair for pair in ranges
            ]
        _check(
            ranges is None
            or (
                isinstance(ranges, list)
                and bool(ranges)
                and all(
                    isinstance(pair, list)
                    and len(pair) == 2
                    and all(_is_int(i) for i in pair)
                    and 0 <= pair[0] < pair[1]
                    for pair in ranges
                )
            ),
            "layer_replication",
            ranges,
            "None or a non-empty list of [start, end) layer ranges with 0 <= start < end",
        )

    def _validate_target_parameters(self) -> None:
        names = self.target_parameters
        if names is None:
            return
        _check(
            isinstance(names, list) and all(isinstance(n, str) and n for n in names),
            "target_parameters",
            names,
            'None or a list of parameter names (e.g. ["experts.gate_up_proj"])',
        )
        clashes = {
            "lora_dropout": self.lora_dropout != 0,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": not any(
                self.init_lora_weights is m or self.init_lora_weights == m
                for m in (True, False, "gaussian")
            ),
        }
        for field_name, clash in clashes.items():
            if clash:
                raise ValueError(
                    f"LoraConfig.{field_name}={getattr(self, field_name)!r} cannot be used with "
                    f"target_parameters={names!r} (as in PEFT: a parameter's update is folded "
                    "into the weight); use the default value, or target modules instead."
                )

    def _validate_layer_selection(self) -> None:
        if self.layers_to_transform is None:
            if self.layers_pattern:
                raise ValueError(
                    f"layers_pattern={self.layers_pattern!r} is set but layers_to_transform is "
                    "None; set layers_to_transform to the layer indices to adapt, or drop "
                    "layers_pattern."
                )
            return
        patterns = self.layers_pattern
        if patterns is not None:
            _check(
                isinstance(patterns, (str, list)),
                "layers_pattern",
                patterns,
                "None, a regex string or a list of them",
            )
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                _check_regex("layers_pattern", pattern)
        indices = (
            [self.layers_to_transform]
            if isinstance(self.layers_to_transform, int)
            else self.layers_to_transform
        )
        _check(
            all(isinstance(i, int) and i >= 0 for i in indices),
            "layers_to_transform",
            self.layers_to_transform,
            "a non-negative int or a list of them",
        )
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be combined with a "
                f"regex target_modules={self.target_modules!r}; pass target_modules as a list of "
                "module names, or put the layer indices into the regex."
            )

    @property
    def targets_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules == ALL_LINEAR

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name``: the first matching ``rank_pattern`` key, else ``r``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of ``module_name``: the first matching ``alpha_pattern`` key, else ``lora_alpha``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pattern_key(pattern: dict[str, Any], module_name: str) -> str | None:
    """The first key of a ``rank_pattern`` / ``alpha_pattern`` that matches ``module_name``
    (PEFT's rule: the key is a regex matching the whole name or a dotted suffix); None if none."""
    for key in pattern:
        if compiled(rf"(.*\.)?({key})$").match(module_name):
            return key
    return None


POSITIVE = "a positive finite number"


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _check(ok: bool, field_name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig.{field_name}={value!r} is invalid: expected {expected}.")


def _check_token_indices(value: Any) -> None:
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(_is_int(i) and i >= 0 for i in v)

    _check(
        value is None
        or ids(value)
        or (
            isinstance(value, dict)
            and bool(value)
            and all(isinstance(k, str) and k and ids(v) for k, v in value.items())
        ),
        "trainable_token_indices",
        value,
        "None, a non-empty list of token ids, or {module name: list of token ids}",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_regex(field_name: str, pattern: Any) -> None:
    """``field_name``: e.g. "rank_pattern key"; the error shows it with the pattern."""
    what = f"LoraConfig.{field_name} {shown(pattern)}"
    if not isinstance(pattern, str):
        raise ValueError(f"{what} is invalid: expected a regex string.")
    check_pattern(what, pattern)


def _check_name_spec(field_name: str, spec: Any) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        if spec != ALL_LINEAR:
            _check_regex(field_name, spec)
        return
    if not isinstance(spec, list) or not all(isinstance(s, str) and s for s in spec):
        raise ValueError(
            f"LoraConfig.{field_name}={spec!r} is invalid: expected a regex string, "
            f'"{ALL_LINEAR}", or a list of non-empty module names.'
        )
