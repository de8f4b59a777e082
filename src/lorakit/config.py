"""``LoraConfig``: what to adapt and how, with PEFT's field names and meanings.

The fields round-trip through PEFT's ``adapter_config.json`` (see ``lorakit.io``). Invalid
values raise ``ValueError`` at construction, naming the field and the value; so do regexes that
could take unbounded time to match (``lorakit.config_checks``, ``lorakit.patterns``: configs
are untrusted input). PEFT's other ``LoraConfig`` fields are taken too, by the rule of
``lorakit.peft_fields`` (so ``LoraConfig(**peft_config.to_dict())`` works): bookkeeping is
dropped, a feature lorakit does not implement is a ``ValueError`` unless it is off.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any

from lorakit.config_checks import ALL_LINEAR, TaskType, validate
from lorakit.init_methods import EvaConfig, LoftQConfig, canonical_init
from lorakit.patterns import compiled
from lorakit.peft_fields import without_peft_only_fields

__all__ = ["ALL_LINEAR", "LoraConfig", "TaskType"]


def _taking_peft_fields(cls: type) -> type:
    """``cls(...)`` also takes PEFT's ``LoraConfig`` fields that ``cls`` has none for, by the
    rule of ``lorakit.peft_fields.without_peft_only_fields`` (the one rule the file reader
    ``lorakit.io.config_json`` follows too)."""
    generated = cls.__init__
    own = frozenset(f.name for f in dataclasses.fields(cls))

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        generated(self, *args, **without_peft_only_fields(kwargs, own))

    cls.__init__ = __init__
    return cls


@_taking_peft_fields
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
    embedding, or ``{module name or dotted suffix: token ids}``; saved as
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
    """Modules trained and saved in full (e.g. a classification head)."""
    layer_replication: list[list[int]] | None = None
    """PEFT's: ``[[start, end), ...]`` ranges of decoder layers stacked into a new, longer
    layer list whose copies share the base weights, each copy adapted on its own
    (``lorakit.replication``); e.g. ``[[0, 2], [1, 2]]`` turns layers 0, 1 into 0, 1, 1."""
    init_lora_weights: bool | str = True
    """True: Kaiming-uniform A, zero B. "gaussian": normal A (std 1/r), zero B. False: random B.
    "orthogonal": PEFT's drawn orthogonal A and B (``lorakit.init_factors``).
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
    inference_mode: bool = False
    """PEFT's: True freezes the adapter right after ``inject`` / ``get_peft_model`` (none of its
    tensors requires grad; biases that ``bias`` trains are left as they are, as in PEFT). Not
    read from files: ``load_adapter`` / ``from_pretrained(is_trainable=...)`` decide there."""

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):  # lorakit's or peft's TaskType
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR  # PEFT compares it case-insensitively
        self.init_lora_weights = canonical_init(self.init_lora_weights)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.eva_config, dict):
            self.eva_config = _settings(EvaConfig, "eva_config", self.eva_config)
        if isinstance(self.loftq_config, dict):
            self.loftq_config = _settings(LoftQConfig, "loftq_config", self.loftq_config) or None
        if isinstance(self.layer_replication, (list, tuple)):
            self.layer_replication = [
                list(pair) if isinstance(pair, (list, tuple)) else pair
                for pair in self.layer_replication
            ]
        validate(self)

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
        if pattern_matches(key, module_name):
            return key
    return None


def pattern_matches(key: str, module_name: str) -> bool:
    """Whether the ``rank_pattern`` / ``alpha_pattern`` key ``key`` matches ``module_name``."""
    return compiled(rf"(.*\.)?({key})$").match(module_name) is not None


def _settings(kind: type, field_name: str, fields: dict[str, Any]):
    """``kind(**fields)`` (an ``EvaConfig`` / ``LoftQConfig`` given as a dict, as PEFT's JSON
    has it; None for an empty ``loftq_config``); an unknown key is a ``ValueError`` naming it."""
    if not fields and kind is LoftQConfig:
        return None
    try:
        return kind(**fields)
    except TypeError as error:
        raise ValueError(
            f"LoraConfig.{field_name}={fields!r} is invalid: {error} (the fields of "
            f"lorakit.{kind.__name__} are {', '.join(f.name for f in dataclasses.fields(kind))})."
        ) from None
