"""``lorakit train``'s run: from the settings values (by key, see ``lorakit.train.settings``) to
a trained, saved adapter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.io.atomic import write_text
from lorakit.train.distributed import check_strategy, training_device
from lorakit.train.run_finish import TrainResult

__all__ = ["NOT_RECORDED", "recorded_settings", "train_from_settings"]

NOT_RECORDED = ("resume", "overwrite")
"""Settings left out of ``train_settings.json``: what one invocation does with the output
directory, not the run (``--config OUTPUT/train_settings.json --resume`` repeats the run)."""


def check_adapter_before_loading(model_directory, lora, training, eval_examples) -> None:
    """Inject ``lora`` into the model built on the meta device (no weights, no memory), so that
    target modules that match nothing are reported before the weights load, and check what the
    loop checks of the model (``check_inputs``: an adapter that would train nothing, such as
    ``--alpha 0``). A model that cannot be built that way is left to the real load to judge
    (``train_from_settings`` checks it again, before ``--overwrite`` deletes anything)."""
    import lorakit
    from lorakit.meta_model import build_meta_model
    from lorakit.train.inputs import check_inputs

    try:
        meta_model, _ = build_meta_model(str(model_directory))
    except UserError:
        return
    try:
        lorakit.inject(meta_model, lora)
    except (ValueError, TypeError) as error:  # TypeError: a module lorakit cannot adapt
        raise UserError(str(error)) from None
    check_inputs(meta_model, training, eval_examples)


PATH_SETTINGS = ("model", "data", "eval_data", "output")
"""Settings that may name a local path, which ``train_settings.json`` records absolute."""


def recorded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What ``train_settings.json`` records of ``settings``: all but ``NOT_RECORDED``, with the
    local paths of ``PATH_SETTINGS`` absolute (``_absolute_path``), so that ``--config
    OUTPUT/train_settings.json --resume`` repeats the run from any working directory. (A
    record of an older lorakit, with the paths as typed, is read as any config file: relative
    to the working directory.)"""
    recorded = {key: value for key, value in settings.items() if key not in NOT_RECORDED}
    for key in PATH_SETTINGS:
        value = recorded.get(key)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):  # ("": not given)
            recorded[key] = _absolute_path(key, value)
    return recorded


def _absolute_path(key: str, value: str | os.PathLike) -> str:
    """``value`` of setting ``key`` as an absolute path, unless it names a built-in: a model
    (``BUILTIN_MODELS``) or a dataset (``BUILTIN_DATASETS``), which the loaders take before any
    path of that name, so it stays a name. ``~`` is expanded as the loaders of the model and
    the data expand it; not in ``output``, which the run uses as given (``--output=~/run``,
    where the shell leaves ``~`` alone, writes into ``./~/run``: the record names that)."""
    from lorakit.data.builtin import BUILTIN_DATASETS
    from lorakit.model_specs import BUILTIN_MODELS

    text = os.fspath(value)
    names = {"model": BUILTIN_MODELS, "data": BUILTIN_DATASETS, "eval_data": BUILTIN_DATASETS}
    if text in names.get(key, ()):
        return text
    return os.path.abspath(text if key == "output" else os.path.expanduser(text))


def check_eval_settings(eval_every: int, eval_data: str | None) -> None:
    """``UserError`` for ``--eval-every`` without ``--eval-data`` (nothing to evaluate on)."""
    if eval_every and not eval_data:
        raise UserError(
            f"--eval-every {eval_every} evaluates on --eval-data, which is not given: give "
            "--eval-data SPEC, or leave out --eval-every"
        )


def train_from_settings(settings: dict[str, Any]) -> TrainResult:
    """Check the settings (``{key: value}``, see ``lorakit.train.settings``), the data and the
    LoRA targets, then load the model, inject LoRA, train and save (adapter, metrics, loss
    curve, and the settings as ``train_settings.json``, itself a valid config file, without
    ``NOT_RECORDED``). The adapter records its data's prompt style ("chat" / "plain",
    ``io.save.record_prompt_style``), which ``lorakit generate`` follows."""
    import torch

    from lorakit import data
    from lorakit.data.chat import prompt_style
    from lorakit.io.save import record_prompt_style
    from lorakit.models import load_model
    from lorakit.positions import check_max_length
    from lorakit.train.batches import check_one_global_batch
    from lorakit.train.checkpoint import read_state
    from lorakit.train.inputs import check_inputs
    from lorakit.train.output_dir import prepare_output_dir
    from lorakit.train.resume import checkpoint_to_resume
    from lorakit.train.settings import build_settings

    job, training = build_settings(settings)
    device, lora, examples, eval_examples = _checked_inputs(job, training)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes
    where = dict(resume=job.resume, overwrite=training.overwrite, is_main=main)
    prepare_output_dir(training.output_dir, **where, delete=False)  # refuse before loading
    resumed = checkpoint_to_resume(training.output_dir, job.resume)  # (None: a new run)
    resumed_state = None if resumed is None else read_state(resumed)
    check_one_global_batch(planned_order(len(examples), training, resumed_state)[0])
    model, tokenizer = load_model(
        job.model, progress=False, quantization=job.quantization, dtype=getattr(torch, job.dtype)
    )
    check_max_length(model, job.max_length)  # GPT-2's position table: no longer examples
    torch.manual_seed(training.seed)  # the adapter's initial A, whatever the loading drew
    _inject_lora(model, lora)
    check_inputs(model, training, eval_examples)  # (a model the meta device could not build)
    record_prompt_style(model, prompt_style(examples), training.adapter_name)
    model.to(device)
    tokenized = {"train": data.tokenize_examples(examples, tokenizer, job.max_length)}
    if eval_examples:
        tokenized["eval"] = data.tokenize_examples(eval_examples, tokenizer, job.max_length)
    prepare_output_dir(training.output_dir, **where)  # only now may --overwrite delete

    def start() -> None:  # once the loop's checks passed (a refused --resume announces nothing)
        output = Path(training.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        if main:
            _record_settings(output, settings, job.resume)
            _announce(model, tokenized, training, job.max_length, resumed_state)

    return _train_tokenized(model, tokenized, training, job.resume, start)


def _checked_inputs(job, training) -> tuple[Any, Any, list, list | None]:
    """``train_from_settings``' checks that need only the settings, the data and the model's
    config (nothing loaded or written yet: ``--overwrite`` deletes only after them), in order;
    the training device, the ``LoraConfig``, the training and the evaluation examples (None
    without ``eval_data``)."""
    from lorakit.models import check_model_spec, resolve_model
    from lorakit.train.settings import load_examples_for

    check_strategy(training.strategy)  # fsdp outside torchrun: before any loading
    if training.strategy == "fsdp" and job.quantization is not None:  # (on every rank)
        from lorakit.train.fsdp import quantized_base_error

        raise quantized_base_error(f"--quantization {job.quantization}")
    device = training_device(job.device)  # a GPU that is not there: before any loading
    check_eval_settings(training.eval_every, job.eval_data)
    lora = job.lora_config()
    check_model_spec(job.model)
    if job.quantization is not None:
        _check_quantization(job.quantization, job.model)
    examples = load_examples_for(job.data, job.split, job.style, "train")
    eval_examples = None
    if job.eval_data:
        eval_examples = load_examples_for(job.eval_data, job.eval_split, job.style, "validation")
    check_adapter_before_loading(resolve_model(job.model), lora, training, eval_examples)
    return device, lora, examples, eval_examples


def _check_quantization(quantization: str, model_spec) -> None:
    """Refuse, before any loading, an unknown ``quantization``, one whose package is missing, or
    ``gguf`` for a ``model_spec`` that is not a built-in GGUF model (``check_quantization``)."""
    from lorakit.models import builtin_gguf_file
    from lorakit.quantized.loading import TRAINABLE_QUANTIZATIONS, check_quantization

    check_quantization(quantization, builtin_gguf_file(str(model_spec)), TRAINABLE_QUANTIZATIONS)


def _inject_lora(model, lora) -> None:
    """``lorakit.inject`` the ``lora`` config into ``model``; a target it cannot adapt (its
    ``ValueError`` / ``TypeError``) becomes a ``UserError``."""
    import lorakit

    try:
        lorakit.inject(model, lora)
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None


def _record_settings(output: Path, settings: dict[str, Any], resume: bool) -> None:
    """Write ``settings`` (``recorded_settings``: a valid config file, its local paths
    absolute) as ``<output>/train_settings.json``; a resumed run keeps the record already
    there."""
    recorded = output / "train_settings.json"
    if not (resume and recorded.is_file()):  # a resumed run keeps the run's own record
        text = json.dumps(recorded_settings(settings), indent=1, default=str)
        write_text(recorded, text)


def _announce(model, tokenized: dict, training, max_length: int, resumed_state=None) -> None:
    """Say on stderr what the run will do (examples, optimizer steps, trainable parameters; a
    run resumed from a checkpoint with state ``resumed_state``: from which step, and how many
    remain, planned as the loop plans it: ``resume.planned_run``), and how many
    examples ``max_length`` shortened."""
    from lorakit.accounting import count_parameters

    for part, kind, use in (("train", "training", "train on"), ("eval", "evaluation", "evaluate")):
        if part in tokenized and tokenized[part].num_truncated:
            print(
                f"lorakit: warning: {tokenized[part].num_truncated} of {len(tokenized[part])} "
                f"{kind} examples are longer than --max-length {max_length} tokens and were "
                f"shortened; raise --max-length to {use} them whole",
                file=sys.stderr,
            )
    examples = len(tokenized["train"])
    order, steps = planned_order(examples, training, resumed_state)  # as the loop plans it
    start_step = 0 if resumed_state is None else resumed_state["step"]
    counts = count_parameters(model)
    planned = _steps_text(steps, order, start_step)
    print(
        f"lorakit: training on {examples} examples, {planned}, {counts.trainable:,} trainable "
        f"parameters ({100 * counts.trainable / counts.total:.2f}% of {counts.total:,})",
        file=sys.stderr,
    )


def planned_order(examples: int, training, resumed_state=None):
    """``(batch order, total steps)`` of a run on ``examples`` examples in the processes
    torchrun started (``WORLD_SIZE``; one without it), resuming the checkpoint of state
    ``resumed_state`` (None: a new run), as the loop plans them (``resume.planned_run``)."""
    from lorakit.train.batches import BatchOrder
    from lorakit.train.resume import planned_run

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    own_order = BatchOrder(
        examples, training.batch_size, training.grad_accum, processes, drop_last=processes > 1
    )
    order, steps, _ = planned_run(own_order, training, resumed_state)
    return order, steps


def _steps_text(steps: int, order, start_step: int) -> str:
    """``N optimizer steps of G examples`` (the global batch of ``order``; all the ``n``
    examples where they are fewer, the step's batch being the epoch's short one), and for a
    resumed run from which step and how many of them remain."""
    count = min(order.num_examples, order.global_batch)
    text = f"{steps} optimizer steps of {count} examples"
    if count < order.global_batch:
        text += f" (all of them: the global batch, {order.global_batch}, is larger than the data)"
    if start_step:
        text += f" (resuming after step {start_step}: {max(steps - start_step, 0)} remain)"
    return text


def _train_tokenized(model, tokenized: dict, training, resume: bool, start) -> TrainResult:
    """Train on ``tokenized["train"]`` (and evaluate on ``tokenized["eval"]`` if present); the
    loop's examples are ``("train"|"eval", index)`` pairs; ``start()`` once its checks passed."""
    from lorakit import data
    from lorakit.train.loop import train

    def collate(items):
        return data.collate(tokenized[items[0][0]], [index for _, index in items])

    def length_of(item) -> int:  # batches group examples of similar length
        return len(tokenized[item[0]].input_ids[item[1]])

    def tokens_of(item) -> tuple[list[int], list[int]]:  # checkpoints record the data's digest
        part, index = item
        return tokenized[part].input_ids[index], tokenized[part].labels[index]

    eval_items = (
        [("eval", i) for i in range(len(tokenized["eval"]))] if "eval" in tokenized else None
    )
    return train(
        model,
        [("train", i) for i in range(len(tokenized["train"]))],
        collate,
        training,
        eval_data=eval_items,
        resume=resume,
        length_of=length_of,
        tokens_of=tokens_of,
        on_start=start,
    )
