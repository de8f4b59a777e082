"""``lorakit inspect DIRECTORY [--json]``: what an adapter is, before loading it.

Reads ``adapter_config.json`` and the safetensors header only (``lorakit.io.summary``); a
``FILE.gguf`` is described as a llama.cpp LoRA file (``lorakit.export.gguf_read``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lorakit.init_methods import changes_base, changes_base_in_peft_only
from lorakit.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise an adapter directory (reads the file header only)",
        description="Base model, fingerprint, target modules, ranks, alphas, scaling, dtype, "
        "parameter count, file size and compression ratio of a PEFT-format adapter.",
    )
    parser.add_argument(
        "directory",
        help="adapter directory (adapter_config.json + safetensors), or a GGUF LoRA FILE.gguf",
    )
    parser.add_argument(
        "--adapter-name",
        default="default",
        help="look in DIRECTORY/NAME when DIRECTORY holds several adapters (PEFT's layout)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def _counts(counter: dict[str, int]) -> str:
    if len(counter) == 1:
        return next(iter(counter))
    return ", ".join(f"{value} ({count} modules)" for value, count in counter.items())


def _dora_text(summary: dict[str, Any]) -> str:
    if not summary["use_dora"]:
        return "no"
    count = summary["dora_magnitude_parameters"]
    return f"yes (magnitude vectors: {count:,} parameters, one per output feature)"


def _init_text(init: bool | str) -> str:
    """The init line: a base-changing init (PiSSA, OLoRA, LoftQ, and PEFT's CorDA and LoRA-GA,
    which lorakit refuses to load unconverted) says that the factors fit the rewritten base."""
    if changes_base(init) or changes_base_in_peft_only(init):
        return f"{init} (fits the base that this init overwrote, not the original weights)"
    return json.dumps(init)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned ``label: value`` lines."""
    fingerprint = summary["fingerprint"]
    if not fingerprint["present"]:
        fingerprint_text = "absent (written by peft?): the base cannot be verified on load"
    elif not fingerprint.get("readable", True):
        fingerprint_text = "present but unreadable"
    else:
        fingerprint_text = (
            f"present ({fingerprint['modules']} modules, base dtype "
            f"{', '.join(fingerprint['base_dtypes'])})"
        )
    ratio = summary["compression_ratio"]
    targets = summary["target_modules"]
    if isinstance(targets, list) and len(targets) > 6:
        targets_text = f"{len(targets)} names ({', '.join(targets[:2])}, ...; --json lists all)"
    else:
        targets_text = json.dumps(targets)
    rows = [
        ("adapter", summary["directory"]),
        ("base model", summary["base_model"] or "(not recorded)"),
        ("fingerprint", fingerprint_text),
        ("task type", summary["task_type"] or "-"),
        ("target modules", targets_text),
        ("adapted", f"{summary['adapted_modules']} modules: {', '.join(summary['module_types'])}"),
        ("rank", _counts(summary["ranks"])),
        ("alpha", _counts(summary["alphas"])),
        ("scaling", _counts(summary["scalings"]) + (" (rsLoRA)" if summary["use_rslora"] else "")),
        ("DoRA", _dora_text(summary)),
        ("init", _init_text(summary["init_lora_weights"])),
        (
            "bias",
            summary["bias"] + (" + a bias on lora_B (lora_bias)" if summary["lora_bias"] else ""),
        ),
        ("modules to save", ", ".join(summary["modules_to_save"] or []) or "-"),
        ("dtype", ", ".join(f"{k} ({v} tensors)" for k, v in summary["dtypes"].items())),
        ("parameters", _parameters_text(summary)),
        ("file size", format_bytes(summary["file_bytes"])),
        (
            "compression",
            "-"
            if ratio is None
            else f"{ratio:.1f}x ({summary['adapted_base_parameters']:,} base parameters adapted)",
        ),
    ]
    if summary["trainable_token_indices"] is not None:
        rows.insert(-4, ("trainable tokens", json.dumps(summary["trainable_token_indices"])))
    if summary["target_parameters"]:
        parameters = f"{json.dumps(summary['target_parameters'])} "
        rows.insert(6, ("target parameters", parameters + f"({summary['adapted_parameters']})"))
    if summary["layer_replication"]:
        rows.insert(5, ("layer replication", json.dumps(summary["layer_replication"])))
    rows.insert(1, ("written by", _writer_text(summary.get("peft_version"))))
    rows += [("read as written", line) for line in summary.get("read_as_written", [])]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)


def _writer_text(version: str | None) -> str:
    """The peft release that wrote the file; a file without ``peft_version`` is lorakit's own
    or from a peft before 0.18 (read by peft 0.22's rules unless its tensors say otherwise)."""
    if version is None:
        return "not recorded (lorakit, or peft < 0.18)"
    return f"peft {version}"


def _parameters_text(summary: dict) -> str:
    """The adapter's parameters (PEFT's trainable count), and the frozen base weights the file
    also holds (PEFT's saved embedding matrix), when there are any."""
    text = f"{summary['parameters']:,} ({summary['lora_parameters']:,} LoRA)"
    if summary["saved_base_weights"]:
        text += f"; the file also holds {summary['saved_base_weights']:,} base embedding weights"
    return text


def run(args: argparse.Namespace) -> int:
    if args.directory.endswith(".gguf"):  # a llama.cpp LoRA file
        from lorakit.export.gguf_read import format_gguf_summary, summarize_gguf_adapter

        summary = summarize_gguf_adapter(args.directory)
        print(json.dumps(summary, indent=2) if args.json else format_gguf_summary(summary))
        return 0
    from lorakit.io.summary import summarize_adapter

    summary = summarize_adapter(args.directory, args.adapter_name)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
