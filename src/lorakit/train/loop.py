"""The training loop: AdamW on the adapter, warmup + cosine, accumulation, clipping, LoRA+,
periodic evaluation, checkpoints, exact resume, DDP or FSDP under torchrun.

One optimizer step ``t`` (see ``BatchOrder``) runs ``grad_accum`` micro-batches per process and
minimises the mean loss per target (token, or example for sequence classification) of the whole
global batch, the loss being the one of the model's task (``lorakit.train.losses``)::

    L_t = sum_{micro, rank} sum_{targets} loss / N_t,     N_t = number of targets in the step

so accumulation and data parallelism reproduce the big-batch gradient (DDP and FSDP average over
the ``W`` processes, hence each process back-propagates ``W * loss_sum / N_t``). Under FSDP
(``lorakit.train.fsdp``) forward passes are collective, so every process evaluates, and
checkpoints and the adapter are gathered by all processes and written by process 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.train.batches import (
    BatchOrder,
    LengthOf,
    TokensOf,
    check_one_global_batch,
    example_lengths,
    shortest_first,
)
from lorakit.train.checkpoint import (
    Saver,
    read_state,
)
from lorakit.train.config import TrainingConfig
from lorakit.train.distributed import Distributed, setup_distributed
from lorakit.train.fsdp import ShardedSaver, check_shardable, reshard, whole
from lorakit.train.gradient_checkpointing import enable_gradient_checkpointing
from lorakit.train.inputs import check_inputs, check_labels_fit, labels_task
from lorakit.train.losses import (
    NO_EVAL_TARGETS,
    Batch,
    MetricFn,
    batch_loss_sum,
    evaluate,
    exact_match_counts,
    target_count,
)
from lorakit.train.metrics import MetricsLog
from lorakit.train.optim import (
    build_optimizer,
    parameter_groups,
    resumes_decaying_all,
)
from lorakit.train.output_dir import prepare_output_dir
from lorakit.train.resume import (
    checkpoint_to_resume,
    planned_run,
)
from lorakit.train.rng import seed_everything
from lorakit.train.run_checkpoints import RunCheckpoints
from lorakit.train.run_finish import RunFinish, TrainResult
from lorakit.train.schedule import build_scheduler, warmup_steps_for
from lorakit.train.sharded_model import refuse_sharded

__all__ = ["TrainResult", "enable_gradient_checkpointing", "train"]

Collate = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


def train(
    model: nn.Module,
    train_data: Sequence[Any],
    collate: Collate,
    config: TrainingConfig,
    *,
    eval_data: Sequence[Any] | None = None,
    metric_fn: MetricFn | None = exact_match_counts,
    resume: bool | str = False,
    length_of: LengthOf | None = None,
    tokens_of: TokensOf | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train the active adapter of ``model`` (already injected) on ``train_data``.

    ``collate(examples) -> batch`` turns examples into tensors (``input_ids``, ``attention_mask``,
    ``labels``; see ``pad_collate``). ``resume``: True continues from the newest checkpoint in
    ``config.output_dir`` (a ``UserError`` if there is none), a path continues from that
    checkpoint; either is refused when its settings or base weights differ from this run's
    (``lorakit.train.resume``). Without ``resume``, or with the path of another run's
    checkpoint (one not under ``config.output_dir/checkpoints``), an output directory holding a
    previous run is refused unless ``config.overwrite`` (which deletes that run's files; see
    ``lorakit.train.output_dir``). ``config.adapter_name`` must name an adapter of ``model``.
    ``length_of(example) -> tokens`` lets batches group examples of similar length (less
    padding; see ``BatchOrder``); by default it is ``len(example["input_ids"])`` for mapping
    examples, and without it batches are a plain shuffle. ``tokens_of(example) -> (input_ids,
    labels)`` lets checkpoints record a digest of the data (``examples_sha256``; by default
    read from mapping examples) that a resumed run must match. Under torchrun with
    ``config.strategy == "fsdp"`` the model is sharded in place and stays sharded afterwards
    (``lorakit.train.fsdp``; a second ``train`` or ``save_adapter`` of it is refused); the saved
    ``adapter/`` is whole. ``on_start()`` is called once every check has passed, before the
    output directory is prepared (``lorakit train`` announces the run there).
    """
    if len(train_data) == 0:
        raise UserError("the training data is empty")
    refuse_sharded(model, "lorakit.train.train")  # (before anything is checked or deleted)
    run = _Run(model, train_data, collate, config, eval_data, metric_fn, length_of, resume)
    run.check_resume(tokens_of)
    if on_start is not None:
        on_start()
    return run.run()


class _Run(RunCheckpoints, RunFinish):
    """The state of one training run (kept out of ``train`` to keep functions short)."""

    def __init__(self, model, train_data, collate, config, eval_data, metric_fn, length_of, resume):
        self.model, self.data, self.collate, self.config = model, train_data, collate, config
        self.eval_data, self.metric_fn = eval_data, metric_fn
        self.eval_order = shortest_first(eval_data or [], length_of)
        check_inputs(model, config, eval_data)
        device = next(iter(model.parameters())).device  # (there are some: check_inputs)
        self.dist: Distributed = setup_distributed(config.strategy, device)
        if self.dist.sharded:  # FSDP's refusals: before overwrite deletes the previous run
            check_shardable(model)
        self.output_dir = Path(config.output_dir)
        self.resume = resume
        self.resume_from = checkpoint_to_resume(self.output_dir, resume)
        self.resume_state = None if self.resume_from is None else read_state(self.resume_from)
        own_order = self._batch_order(example_lengths(train_data, length_of))
        self.batch_order, self.total_steps, self.steps_rule = planned_run(
            own_order, config, self.resume_state
        )  # ("round": an older checkpoint's count of --epochs)
        check_one_global_batch(self.batch_order)
        check_labels_fit(model, collate, train_data[0])  # (a classifier's: before any write)
        if eval_data and not any(self._targets(batch) for batch in self.eval_batches()):
            raise UserError(NO_EVAL_TARGETS)  # (now, not at the first evaluation)
        name = config.adapter_name  # ShardedSaver: before sharding (its refusals before deleting)
        self.saver = ShardedSaver(model, name) if self.dist.sharded else Saver(name)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.dist.is_main)
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None
        self.examples_sha256: str | None = None

    def _targets(self, batch: Batch) -> int:
        """``target_count`` of ``batch`` for the task of the model and the batch's labels."""
        return target_count(batch, labels_task(self.model, batch["labels"]))

    def _batch_order(self, lengths: tuple[int, ...] | None) -> BatchOrder:
        """This run's own batch plan: under torchrun the epoch's short batch is dropped, in one
        process kept (a resumed run then follows its checkpoint's choice where it can:
        ``planned_run``)."""
        config = self.config
        return BatchOrder(
            len(self.data),
            config.batch_size,
            config.grad_accum,
            self.dist.world_size,
            config.seed,
            drop_last=self.dist.enabled,
            lengths=lengths,
        )

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> int:
        config = self.config
        main = self.dist.is_main
        prepare_output_dir(
            self.output_dir, resume=self.resume, overwrite=config.overwrite, is_main=main
        )
        self.dist.barrier()  # no process writes before every process has looked
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.ddp_model = self.dist.wrap(self.model)  # FSDP: before the optimizer sees parameters
        self.parameters = parameter_groups(self.model).all
        self.decays_all = resumes_decaying_all(
            self.model, self.resume_from, self.resume_state, config.weight_decay, self.dist.is_main
        )
        self.optimizer = build_optimizer(
            self.model,
            config.lr,
            config.weight_decay,
            config.loraplus_ratio,
            decay_all=self.decays_all,
        )
        warmup = warmup_steps_for(self.total_steps, config.warmup_steps, config.warmup_ratio)
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, warmup, config.min_lr_ratio
        )
        seed_everything(config.seed + self.dist.rank)
        start_step = self._restore() if self.resume_from is not None else 0
        self.model.train()
        return start_step

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        start_step = self._prepare()
        progress = self._progress_bar(start_step)
        for step in range(start_step, self.total_steps):
            record = self._optimizer_step(step)
            self.last_loss = record["loss"]
            self.metrics.write(record)
            if progress is not None:  # count first, so "n/N" shows step n's values
                progress.update(1)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
            self._after_step(step + 1)
        if progress is not None:
            progress.close()
        return self._finish(start_step)

    def _progress_bar(self, start_step: int):
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step")

    def _optimizer_step(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        batches = [
            self.collate([self.data[i] for i in indices])
            for indices in self.batch_order.micro_batches(step, self.dist.rank)
            if indices
        ]
        targets = self.dist.sum(sum(self._targets(batch) for batch in batches))
        if targets == 0:
            raise UserError(f"step {step}: no target tokens in the batch (all labels are -100)")
        loss_sum, tokens = 0.0, 0
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            sync = nullcontext() if last else self.dist.accumulating(self.ddp_model)
            with sync:
                micro_loss, _, _ = batch_loss_sum(self.ddp_model, batch)
                (micro_loss * (self.dist.world_size / targets)).backward()
            loss_sum += float(micro_loss.detach())
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        return {
            "step": step + 1,
            "epoch": round((step + 1) / self.batch_order.steps_per_epoch, 4),
            "loss": self.dist.sum(loss_sum) / targets,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": self.dist.sum(tokens) / max(elapsed, 1e-9),
        }

    def _after_step(self, done: int) -> None:
        config = self.config
        if config.eval_every and done % config.eval_every == 0 and self.eval_data:
            self._evaluate(done)
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            self._checkpoint(done)

    def _evaluate(self, done: int) -> None:
        self.last_eval_step = done
        if self.evaluates_here:  # the main process; under FSDP every one
            self.last_eval = self.evaluate()
        if self.dist.sharded:
            reshard(self.model)
        if self.dist.is_main:
            record = {"step": done, **{f"eval_{k}": v for k, v in self.last_eval.items()}}
            self.metrics.write(record)
        self.dist.barrier()

    def eval_batches(self) -> Iterator[Batch]:
        """The evaluation data collated in batches of ``batch_size``, shortest first."""
        size, order = self.config.batch_size, self.eval_order
        for start in range(0, len(order), size):
            yield self.collate([self.eval_data[i] for i in order[start : start + size]])

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_batches(), self.metric_fn)
