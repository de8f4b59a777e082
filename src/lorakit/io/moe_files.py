"""PEFT's transformers-4 MoE adapter files, converted on load to the fused transformers-5 layout.

A Mixtral / Qwen2-MoE-style adapter saved with transformers 4 holds one LoRA pair per expert
module: ``<holder>.experts.<e>.<name>.lora_A.weight`` (r, k) and ``.lora_B.weight`` (d, r),
``<name>`` one of Mixtral's ``w1`` / ``w3`` / ``w2`` or Qwen2-MoE's ``gate_proj`` / ``up_proj`` /
``down_proj``. transformers 5 fused those experts into ``experts.gate_up_proj`` (E, 2 f, d) =
per expert ``[gate; up]`` and ``experts.down_proj`` (E, d, f); PEFT (0.21) converts the config
(``lorakit.moe_targets.convert_moe_config``) and the tensors of such a file when it loads it.
This module converts the tensors to the same layout (PEFT's ``PeftConcatenate``,
``FlattenDims`` and ``PermuteDims`` over transformers' conversion mapping). For a fused
parameter of P projections (``gate_up_proj``: P = 2, gate then up; ``down_proj``: P = 1), E
experts and per-expert factors ``A[p, e]`` (r, k), ``B[p, e]`` (d_p, r):

    A_e = [A[1, e]; ...; A[P, e]]               (P r, k)
    B_e = block_diag(B[1, e], ..., B[P, e])     (sum d_p, P r)
    A[e P r + j, :] = A_e[j, :]                 (E P r, k)          rows expert-major
    B[:, j E + e]   = B_e[:, j]                 (sum d_p, P r E)    columns rank-major

so that expert e's update ``s B_e A_e`` is ``[s B[1, e] A[1, e]; ...]``: each projection's own
update, the rank and alpha both multiplied by P (``s`` kept). Mixtral's ``block_sparse_moe`` is
renamed ``mlp`` in every key (the router ``gate`` included). Only a file that converts exactly is
converted (every expert of the model present for every projection, one rank and one scaling for
all of them); any other is refused with ``AdapterFileError`` naming the keys.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, listed
from lorakit.io.file_tensors import FileTensor
from lorakit.io.header import TensorInfo
from lorakit.io.keys import PREFIX, module_path
from lorakit.io.moved_moe_modules import refuse_moved_modules
from lorakit.io.read import AdapterHeader
from lorakit.layers.parameter import parameter_layout
from lorakit.moe_targets import expert_parts, renamed_modules

__all__ = [
    "ExpertConversion",
    "converted_config",
    "converted_header",
    "expert_conversion",
    "file_keys",
    "fuse_expert_tensors",
    "refuse_moved_modules",
]

_EXPERT_KEY = re.compile(
    r"^(?P<holder>.+)\.experts\.(?P<expert>\d+)\.(?P<name>[^.]+)\.(?P<role>lora_A|lora_B)\.weight$"
)
_REDO = "Load it with peft (PeftModel.from_pretrained) and save it again, then load that."


@dataclass(frozen=True)
class ExpertConversion:
    """How a per-expert file becomes a fused one: ``fused`` maps each new key to its role and
    its source keys ``[p][e]`` (projection p of the fused parameter, expert e); ``renamed``
    maps every other new key to its key in the file."""

    fused: dict[str, tuple[str, list[list[str]]]]
    renamed: dict[str, str]
    ranks: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    """``{fused parameter path: (rank, alpha)}``: P times its experts' one rank and alpha (the
    file's config may give them by ``rank_pattern`` / ``alpha_pattern`` keys on the old expert
    modules, which match nothing once fused)."""


def _rename(path: str, family: str) -> str:
    """``path`` with each dotted part transformers 5 renamed (``block_sparse_moe`` -> ``mlp``)."""
    renames = renamed_modules(family)
    return ".".join(renames.get(part, part) for part in path.split("."))


def _expert_groups(keys, family: str) -> dict[tuple[str, str], dict[int, dict[int, str]]]:
    """``{(fused parameter path, role): {projection: {expert: file key}}}`` of the per-expert
    keys among ``keys`` (transformers-5 paths)."""
    parts = expert_parts(family)
    groups: dict[tuple[str, str], dict[int, dict[int, str]]] = {}
    for key in keys:
        found = _EXPERT_KEY.match(key)
        if found is None or found["name"] not in parts:
            continue
        fused, place = parts[found["name"]]
        holder = _rename(module_path(found["holder"]), family)
        group = groups.setdefault((f"{holder}.experts.{fused}", found["role"]), {})
        group.setdefault(place, {})[int(found["expert"])] = key
    return groups


def expert_conversion(
    adapter: AdapterHeader,
    original: LoraConfig,
    family: str | None,
    entries: list[FileTensor],
    modules: dict[str, nn.Module],
) -> ExpertConversion | None:
    """The conversion of ``adapter``'s per-expert keys to the keys ``entries`` (the plan of the
    converted config ``original`` became) expects; None when the file has no per-expert keys of
    ``family``. ``AdapterFileError`` naming the keys when it cannot be converted exactly."""
    groups = _expert_groups(adapter.tensors, family) if family else {}
    if not groups:
        return None
    wanted = {(e.parameter, e.role): e.key for e in entries if e.parameter}
    fused, ranks = {}, {}
    for (parameter, role), places in sorted(groups.items()):
        keys = sorted(k for experts in places.values() for k in experts.values())
        if (parameter, role) not in wanted:
            raise AdapterFileError(
                f"adapter {adapter.directory} holds per-expert tensors ({listed(keys, 4)}) that "
                f"would become {parameter!r}, which its config does not adapt on this model. "
                f"{_REDO}"
            )
        owner, _, name = parameter.rpartition(".")
        experts = parameter_layout(getattr(modules[owner], name), False)[0]
        count = sum(1 for fused_name, _ in expert_parts(family).values() if fused_name == name)
        _check_complete(adapter, parameter, places, experts, count)
        rank, alpha = _check_one_rank(adapter, original, places, role)
        ranks[parameter] = (len(places) * rank, len(places) * alpha)  # (gate, up): r and alpha x2
        fused[wanted[parameter, role]] = (role, [list(places[p].values()) for p in sorted(places)])
    taken = {key for _, sources in fused.values() for keys in sources for key in keys}
    renamed = {
        PREFIX + _rename(module_path(key), family) if key.startswith(PREFIX) else key: key
        for key in adapter.tensors
        if key not in taken
    }
    return ExpertConversion(fused, renamed, ranks)


def converted_config(config: LoraConfig, conversion: ExpertConversion) -> LoraConfig:
    """``config`` (converted by ``moe_targets.convert_moe_config``) with each fused parameter's
    rank and alpha (``ExpertConversion.ranks``) where its patterns give another: a key naming
    the parameter exactly, first (the old file's keys name expert modules that are gone)."""
    ranks = {k: r for k, (r, _) in conversion.ranks.items() if config.rank_for(k) != r}
    alphas = {k: a for k, (_, a) in conversion.ranks.items() if config.alpha_for(k) != a}
    if not ranks and not alphas:
        return config
    return config.replace(
        rank_pattern={**{re.escape(k): r for k, r in ranks.items()}, **config.rank_pattern},
        alpha_pattern={**{re.escape(k): a for k, a in alphas.items()}, **config.alpha_pattern},
    )


def _check_complete(adapter, parameter: str, places, experts: int, count: int) -> None:
    """Every projection (``count``) and every expert (0 .. ``experts`` - 1) present."""
    for place in range(count):
        present = sorted(places.get(place, {}))
        if present != list(range(experts)):
            keys = sorted(k for p in places.values() for k in p.values())
            raise AdapterFileError(
                f"adapter {adapter.directory}: the per-expert tensors for {parameter!r} "
                f"({listed(keys, 4)}) cover experts {present} of projection {place}, but this "
                f"model has {experts} experts, each of {count} projection(s), fused into one "
                f"parameter: lorakit converts only complete files. {_REDO}"
            )
        places[place] = dict(sorted(places[place].items()))


def _check_one_rank(adapter, original: LoraConfig, places, role: str) -> tuple[int, float]:
    """One 2-D shape per projection (one for all of them for A), hence one rank, one rank /
    alpha from ``original``'s patterns for every expert module, and no rsLoRA on a fused
    pair: else the fused parameter's one rank and scaling could not be each expert's. That
    ``(rank, alpha)``."""
    keys = [k for p in places.values() for k in p.values()]
    shapes = [{tuple(adapter.tensors[k].shape) for k in p.values()} for p in places.values()]
    if role == "lora_A":
        shapes = [set().union(*shapes)]
    axis = 0 if role == "lora_A" else 1
    ranks = {shape[axis] for group in shapes for shape in group if len(shape) == 2}
    one_shape = all(len(group) == 1 and len(next(iter(group))) == 2 for group in shapes)
    paths = [module_path(k).rsplit(".", 2)[0] for k in keys]  # the expert modules
    patterns = {(original.rank_for(p), original.alpha_for(p)) for p in paths}
    rslora = original.use_rslora and len(places) > 1
    if not one_shape or len(ranks) != 1 or len(patterns) != 1 or rslora:
        raise AdapterFileError(
            f"adapter {adapter.directory}: the per-expert tensors {listed(sorted(keys), 4)} do "
            f"not share one shape, rank and scaling (ranks {sorted(ranks)}, (r, alpha) "
            f"{sorted(patterns)}, use_rslora={original.use_rslora}), so they cannot be fused "
            f"exactly into one LoRA on the transformers-5 parameter. {_REDO}"
        )
    (rank,), (config_rank, alpha) = ranks, next(iter(patterns))
    if rank != config_rank:
        first = sorted(keys)[0]
        raise AdapterFileError(
            f"adapter {adapter.directory}: {first} has rank {rank}, but adapter_config.json "
            f"gives its expert module rank {config_rank} (r / rank_pattern); the config and the "
            "weights disagree: fix r / rank_pattern, or re-save the adapter."
        )
    return config_rank, alpha


def fuse_expert_tensors(
    tensors: dict[str, torch.Tensor], conversion: ExpertConversion
) -> dict[str, torch.Tensor]:
    """The file's tensors in the fused layout (see the module docstring for the formulas)."""
    out = {new: tensors[old] for new, old in conversion.renamed.items()}
    for new, (role, sources) in conversion.fused.items():
        per_expert = list(zip(*[[tensors[k] for k in keys] for keys in sources], strict=True))
        if role == "lora_A":  # A_e = [A[1, e]; ...] (P r, k); experts stacked: (E P r, k)
            out[new] = torch.cat([torch.cat(parts, dim=0) for parts in per_expert], dim=0)
        else:  # B_e = block_diag(B[p, e]) (D, P r); B[:, j E + e] = B_e[:, j]: (D, P r E)
            stacked = torch.stack([torch.block_diag(*parts) for parts in per_expert])  # (E, D, R)
            out[new] = stacked.permute(1, 2, 0).reshape(stacked.shape[1], -1).contiguous()
    return out


def converted_header(adapter: AdapterHeader, conversion: ExpertConversion) -> AdapterHeader:
    """``adapter``'s header as the fused file's would read (shapes and dtypes, no offsets; no
    fingerprint: it was recorded on transformers-4 module paths), for the checks that run
    before the data is read."""
    tensors = {new: adapter.tensors[old] for new, old in conversion.renamed.items()}
    for new, (role, sources) in conversion.fused.items():
        first = [adapter.tensors[keys[0]] for keys in sources]  # expert 0 of each projection
        experts, rank_axis = len(sources[0]), 0 if role == "lora_A" else 1
        rank = sum(info.shape[rank_axis] for info in first) * experts
        if role == "lora_A":  # (E P r, k)
            shape = (rank, first[0].shape[1])
        else:  # (sum d_p, P r E)
            shape = (sum(info.shape[0] for info in first), rank)
        tensors[new] = TensorInfo(first[0].dtype, shape, 0, 0)
    return dataclasses.replace(adapter, tensors=tensors, fingerprint=None)


def file_keys(conversion: ExpertConversion, keys: list[str]) -> list[str]:
    """The file's keys that the fused ``keys`` come from."""
    found = []
    for key in keys:
        if key in conversion.fused:
            found += [old for olds in conversion.fused[key][1] for old in olds]
        else:
            found.append(conversion.renamed.get(key, key))
    return found
