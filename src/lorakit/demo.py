"""``lorakit demo``: teach SmolLM2-135M-Instruct movie-review sentiment with a LoRA adapter.

Steps: load the packaged model; zero-shot accuracy on held-out Rotten Tomatoes test reviews
(scored by comparing the next-token log-probabilities of the answer words' first tokens: in the
default chat style "positive" and "negative", after the assistant header; " positive" and
" negative" with --style plain); LoRA
(r=16, all seven projections) trained on the training split; accuracy again on the same held-out
reviews; adapter saved (PEFT format) and its size compared with the base model's; adapter merged
into the weights and the merged model's predictions compared with the adapter's; loss curve and
summary (JSON + readable lines) written to the output directory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.demo_files import (
    DEMO_MARKER,
    check_claimable,
    check_merged_agrees,
    claim_output,
    file_sizes,
    summary_lines,
    write_predictions,
    write_summary,
)
from lorakit.model_specs import recorded_spec
from lorakit.quantization_names import TRAINABLE_QUANTIZATIONS
from lorakit.train.config import SettingError, setting

__all__ = ["DEMO_MARKER", "DemoSettings", "run_demo", "summary_lines"]

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoSettings:
    """What the demo does (the defaults finish in a few minutes on 2 CPU cores). The fields made
    with ``setting`` are ``lorakit demo``'s options (see ``lorakit.train.config.setting``)."""

    output: str = setting("lorakit-demo", "output dir")
    model: str = "smollm2-135m-instruct"
    steps: int = setting(60, "optimizer steps")
    batch_size: int = setting(8, "reviews per step")
    lr: float = setting(1e-3, "learning rate")
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    use_dora: bool = setting(False, "train a DoRA adapter (PEFT's use_dora=True) instead of LoRA")
    max_length: int = setting(96, "max tokens per example")
    eval_size: int = setting(200, "held-out test reviews")
    style: str = setting(
        "chat",
        "prompt form: the chat template, or plain 'Review: ...\\nSentiment:'",
        choices=("chat", "plain"),
    )
    seed: int = setting(0, "random seed")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", negated=True)
    quantization: str | None = setting(
        None,
        "fine-tune on a quantized frozen base: nf4, fp4, int8 (bitsandbytes, on the CPU) or gguf "
        "(the model's own Q4_1 GGUF blocks); see docs/quantized.md (default: float)",
        choices=TRAINABLE_QUANTIZATIONS,
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:  # a prompt token and the answer's
            raise SettingError("max_length", f"must be >= 2, got {self.max_length}")
        if not 0 < self.lr < math.inf:  # (nan and inf fail too)
            raise SettingError("lr", f"must be a finite number > 0, got {self.lr}")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _accuracy(model, tokenizer, examples, settings: DemoSettings) -> tuple[float, list[int], Any]:
    from lorakit import data

    model.eval()
    result = data.classify(
        model, tokenizer, examples, batch_size=32, max_length=settings.max_length
    )
    return result.accuracy, result.predictions, result.log_probs


def _check_template_fits(example, settings: DemoSettings) -> None:
    """``UserError`` where ``--max-length`` cannot hold the demo's prompt template and answer
    with an empty review (``data.fit.template_length``, with the model's tokenizer alone): every
    prompt would then lose its start, the system prompt and instruction, not only review words."""
    from lorakit.data.fit import template_length
    from lorakit.errors import UserError
    from lorakit.models import load_tokenizer, resolve_model

    max_length = settings.max_length
    needed = template_length(example, load_tokenizer(resolve_model(settings.model)))
    if needed is not None and needed > max_length:
        raise UserError(
            f"--max-length {max_length} cannot hold the demo's prompt template and answer "
            f"({needed} tokens with an empty review): every prompt would lose its system prompt "
            f"and instruction. Give --max-length {needed} or more (long reviews are then "
            "shortened inside the template)"
        )


def _held_out(settings: DemoSettings):
    """The first ``eval_size`` test reviews (a fixed pseudo-random sample); checked before the
    model loads."""
    from lorakit import data
    from lorakit.errors import UserError

    test = data.load_examples("rotten-tomatoes", "test", style=settings.style)
    if len(test) < settings.eval_size:
        raise UserError(
            f"--eval-size {settings.eval_size}: the Rotten Tomatoes test split holds only "
            f"{len(test)} reviews; give at most {len(test)}"
        )
    return test[: settings.eval_size]


def _train(model, tokenizer, settings: DemoSettings, output: Path):
    import torch

    import lorakit
    from lorakit import data
    from lorakit.data.chat import prompt_style
    from lorakit.io.save import record_prompt_style
    from lorakit.train import TrainingConfig, train

    needed = settings.steps * settings.batch_size
    examples = data.load_examples("rotten-tomatoes", "train", style=settings.style)[:needed]
    tokenized = data.tokenize_examples(examples, tokenizer, settings.max_length)
    config = lorakit.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_dora=settings.use_dora,
        target_modules=SEVEN_PROJECTIONS,
        task_type="CAUSAL_LM",
        base_model_name_or_path=recorded_spec(settings.model),  # the spec, not the cache path
    )
    torch.manual_seed(settings.seed)  # the adapter's initial A, whatever loading the model drew
    lorakit.inject(model, config)
    record_prompt_style(model, prompt_style(examples))  # lorakit generate follows it
    counts = lorakit.count_parameters(model)
    training = TrainingConfig(
        output_dir=str(output),
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=max(1, settings.steps // 10),
        seed=settings.seed,
        progress=settings.progress,
        overwrite=True,  # the output is the demo's (claim_output): a previous demo's results go
    )
    kind = "DoRA" if settings.use_dora else "LoRA"
    _say(
        f"training {kind} r={settings.rank} on {len(tokenized)} training reviews, "
        f"{settings.steps} steps of {settings.batch_size}"
    )
    result = train(
        model,
        range(len(tokenized)),
        lambda idx: data.collate(tokenized, idx),
        training,
        length_of=lambda index: len(tokenized.input_ids[index]),
    )
    return result, counts, len(tokenized)


def _base_parameter_count(model) -> int:
    """The model's numbers, a quantized linear counted as its (out x in) matrix (+ bias), not
    as its packed storage."""
    from lorakit import quantized

    count, seen = 0, set()  # a tied weight (embedding and output layer) counts once
    for module in model.modules():
        if quantized.is_quantized(module):
            out_features, in_features = quantized.shape(module)
            bias = getattr(module, "bias", None)
            count += out_features * in_features + (0 if bias is None else bias.numel())
            continue
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                count += parameter.numel()
    return count


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also written to ``<output>/summary.json``)."""
    from lorakit.io import save_adapter
    from lorakit.models import load_model

    started = time.perf_counter()
    output = Path(settings.output)
    held_out = _held_out(settings)
    check_claimable(output)  # (refusals before the previous results are removed)
    _check_template_fits(held_out[0], settings)
    claim_output(output)
    _say(f"loading {settings.model}")
    model, tokenizer = load_model(
        settings.model, progress=False, quantization=settings.quantization
    )
    base_parameters = _base_parameter_count(model)
    _say(f"zero-shot accuracy on {len(held_out)} held-out test reviews ...")
    before, zero_shot_predictions, _ = _accuracy(model, tokenizer, held_out, settings)
    _say(f"zero-shot accuracy: {before:.1%}")
    result, counts, train_size = _train(model, tokenizer, settings, output)
    after, predictions, log_probs = _accuracy(model, tokenizer, held_out, settings)
    _say(f"accuracy after {'DoRA' if settings.use_dora else 'LoRA'} fine-tuning: {after:.1%}")
    adapter_dir = save_adapter(model, output / "adapter")
    sizes = file_sizes(settings.model, adapter_dir, base_parameters)
    merged_predictions, merged_fields = _merge_and_compare(
        model, tokenizer, held_out, settings, predictions, log_probs
    )
    write_predictions(
        output / "predictions.jsonl",
        held_out,
        zero_shot_predictions,
        predictions,
        merged_predictions,
    )
    summary = {
        "model": settings.model,
        "held_out_reviews": len(held_out),
        "training_reviews": train_size,
        "zero_shot_accuracy": before,
        "fine_tuned_accuracy": after,
        "accuracy_gain_points": 100.0 * (after - before),
        **merged_fields,
        "trainable_parameters": counts.trainable,
        "base_parameters": base_parameters,
        **sizes,
        "steps": result.steps,
        "use_dora": settings.use_dora,
        "final_train_loss": result.final_loss,
        "settings": settings.__dict__,
        "adapter_dir": str(adapter_dir),
        "loss_curve": str(result.loss_curve),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_summary(output, summary)
    check_merged_agrees(summary, output)
    return summary


def _merge_and_compare(
    model, tokenizer, held_out, settings: DemoSettings, predictions: list[int], log_probs
) -> tuple[list[int], dict[str, Any]]:
    """Merge the adapter into ``model`` (``merge_and_unload``) and score the merged model on
    ``held_out`` against the adapter model's ``predictions`` and ``log_probs`` ((N, choices)):
    returns its predictions and the summary's ``merged_*`` fields (accuracy, agreements,
    ``max |log p_merged - log p_adapter|``, disagreements at near ties)."""
    import lorakit

    model = lorakit.merge_and_unload(model)
    merged, merged_predictions, merged_log_probs = _accuracy(model, tokenizer, held_out, settings)
    agree = sum(a == b for a, b in zip(predictions, merged_predictions, strict=True))
    max_difference = float((merged_log_probs - log_probs).abs().max())
    near_ties = _near_ties(log_probs, predictions, merged_predictions, max_difference)
    return merged_predictions, {
        "merged_accuracy": merged,
        "merged_predictions_agree": agree,
        "merged_max_abs_logprob_difference": max_difference,
        "merged_disagreements_at_near_ties": near_ties,
    }


def _near_ties(log_probs, predictions, merged_predictions, max_difference: float) -> int:
    """Disagreements the rounding of the merge explains: the adapter model's top two choices
    were within ``min(2 * max |log-prob difference|, 1e-4)`` of each other, so a difference
    that small can swap them (a broken merge, with large differences, is never excused)."""
    top_two = log_probs.topk(2, dim=-1).values  # (N, 2)
    margins = (top_two[:, 0] - top_two[:, 1]).tolist()
    tolerance = min(2 * max_difference, 1e-4)
    return sum(
        a != b and margin <= tolerance
        for a, b, margin in zip(predictions, merged_predictions, margins, strict=True)
    )
