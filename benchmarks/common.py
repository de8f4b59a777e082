"""Shared benchmark machinery: SmolLM2-135M shapes, A B A B timing, memory probes, JSON output.

Timing rule (docs/performance.md, "How we measure"): every contender runs in this one process, after a warm-up,
in alternation (A B C A B C ...), and the reported time is the median over the repeats; ratios
are taken between medians measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's lorakit


def parser(description: str, name: str) -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument("--quick", action="store_true", help="tiny sizes (proves it runs)")
    parse.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parse.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parse.add_argument("--layers", type=int, default=8, help="decoder layers (real: 30)")
    parse.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    parse.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="cpu: this process's CPU time (robust on a shared machine with --threads 1); "
        "auto: cpu with one thread, wall otherwise",
    )
    return parse


def set_clock(clock: str, threads: int) -> str:
    """Choose the timer for ``alternate``; returns the clock used (recorded in the JSON)."""
    global _timer
    chosen = ("cpu" if threads == 1 else "wall") if clock == "auto" else clock
    _timer = time.process_time if chosen == "cpu" else time.perf_counter
    return chosen


_timer = time.perf_counter


def now() -> float:
    """The current reading of the chosen clock (seconds)."""
    return _timer()


def smollm2_config(layers: int, quick: bool):
    """SmolLM2-135M's real shapes (hidden 576, MLP 1536, 9 heads / 3 KV, vocab 49152, tied),
    with fewer layers; ``quick``: a tiny model of the same family."""
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            tie_word_embeddings=True,
        )
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


# Layer-dominated shapes (issue 16): the transformer layers carry almost all the compute, as in
# models of 1B and up, instead of SmolLM2's 49,152-word output layer.
SHAPES = {
    "smollm2": None,  # smollm2_config
    "layers": dict(hidden=384, mlp=1024, heads=6, kv_heads=2, layers=4, vocab=2000),
    "1b": dict(hidden=2048, mlp=8192, heads=32, kv_heads=8, layers=2, vocab=2000),
}


def model_config(shape: str, layers: int, quick: bool):
    """The LlamaConfig of a named shape: ``smollm2`` (``smollm2_config`` with ``layers``), or a
    layer-dominated Llama (``layers``: hidden 384, 4 layers; ``1b``: Llama-3.2-1B's hidden 2048 /
    MLP 8192 / 32 heads / 8 KV, 2 layers), both with a 2,000-word vocabulary, untied."""
    sizes = SHAPES[shape]
    if sizes is None or quick:
        return smollm2_config(layers, quick)
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=sizes["hidden"],
        intermediate_size=sizes["mlp"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        vocab_size=sizes["vocab"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def base_model(config, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    return model


def alternate(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1):
    """``{name: [seconds per round]}``: warm-up rounds, then ``repeats`` rounds A B C A B C."""
    for _ in range(warmup):
        for run in contenders.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = _timer()
            run()
            times[name].append(_timer() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def saved_tensor_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes held for backward by ``step()`` (a forward returning the loss), counting each
    storage once and leaving out ``exclude`` (the model's parameters). Deterministic."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    held: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return sum(held.values())


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta(run: Callable[[], object]) -> int | None:
    """Peak RSS during ``run()`` minus RSS before it, in bytes (Linux: resets VmHWM through
    /proc/self/clear_refs); None where that is not available. Allocator caching makes it noisy."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_kib("VmRSS")
        run()
        return (rss_kib("VmHWM") - before) * 1024
    except (OSError, RuntimeError):
        return None


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
    }


def ratio(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` to 3 decimals, or "n/a" when either is missing or zero."""
    if not numerator or not denominator:
        return "n/a"
    return f"{numerator / denominator:.3f}"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Atomic write (tmp file in the target directory, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)
    print(f"wrote {path}")
