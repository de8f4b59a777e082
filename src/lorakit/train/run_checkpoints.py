"""The checkpoint half of a training run (``lorakit.train.loop._Run`` inherits it): what a
checkpoint records beside the tensors (the data plan, the adapter's config, the decay rule), the
checks that a resumed run continues the same one, and the restore.

The run's state this reads and changes: ``model``, ``config``, ``dist``, ``output_dir``,
``data``, ``batch_order``, ``total_steps``, ``steps_rule``, ``resume_from``, ``resume_state``,
``examples_sha256``, ``optimizer``, ``scheduler``, ``saver``, ``decays_all``, ``metrics``,
``last_loss``, ``last_eval``, ``last_eval_step``. ``evaluates_here`` is the rule of which
processes evaluate, shared with the loop: a resumed run restores its last evaluation there only.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.state import adapter_configs
from lorakit.train.batches import TokensOf, examples_sha256
from lorakit.train.checkpoint import load_checkpoint, save_checkpoint
from lorakit.train.metrics import read_metrics
from lorakit.train.optim import DECAY_RULE, DECAY_RULE_KEY
from lorakit.train.resume import (
    base_dtype,
    check_resumable,
    check_resume_base,
    last_eval_step,
    last_values,
)
from lorakit.train.rng import seed_everything

__all__ = ["RunCheckpoints"]


class RunCheckpoints:
    """Checkpoints and resume of ``lorakit.train.loop._Run`` (see the module docstring)."""

    def check_resume(self, tokens_of: TokensOf | None) -> None:
        """Record the data's digest; when resuming, refuse a checkpoint of other settings or data
        (``check_resumable``), then of another base (``check_resume_base``): the settings first,
        so that other ``--target-modules`` are named as such, not as an unverified fingerprint.
        Before anything is written, and before FSDP shards the base weights."""
        if self.resume_from is None and not self.config.checkpoint_every:
            return  # (no checkpoint to record it in, none to compare it with)
        self.examples_sha256 = examples_sha256(self.data, tokens_of)
        if self.resume_from is None:
            return
        plan, lora = self._plan_fields(), self._lora_fields()
        check_resumable(self.resume_from, self.resume_state, plan, self.config, lora)
        check_resume_base(self.model, self.resume_from, self.config.adapter_name)

    def _restore(self) -> int:
        directory = self.resume_from  # (checked by check_resume, before any loading)
        checkpoint = load_checkpoint(directory, self.model, self.optimizer, self.scheduler)
        if self.dist.rank != 0:  # each process continues its own dropout stream
            seed_everything(self.config.seed + self.dist.rank + checkpoint.step)
        if self.dist.is_main:  # (another run's checkpoint may start this one in a new one)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.truncate_after(checkpoint.step)
        records = read_metrics(self.metrics.path)
        self.last_loss, last_eval = last_values(records)  # (the loss: the same on every rank)
        if self.evaluates_here:  # else {}, as in the uninterrupted run (DDP: rank 0 evaluates)
            self.last_eval = last_eval
        evaluated = last_eval_step(records) if self.dist.is_main else None
        self.last_eval_step = int(self.dist.sum(float(evaluated or 0))) or None  # main's view
        return checkpoint.step

    @property
    def evaluates_here(self) -> bool:
        """Whether this process evaluates (and so has an evaluation to report): the main one,
        or under FSDP every one (a sharded forward needs every process)."""
        return self.dist.is_main or self.dist.sharded

    def _plan_fields(self) -> dict[str, Any]:
        fields = {**self.batch_order.identity(), "total_steps": self.total_steps}
        fields["examples_sha256"] = self.examples_sha256  # (another --data or --max-length)
        if self.steps_rule is not None:  # (kept by every later checkpoint of the run)
            fields["steps_rule"] = self.steps_rule
        return fields | {"base_dtype": base_dtype(self.model)}  # (--dtype: exact resume)

    def _lora_fields(self) -> dict[str, Any]:
        config = adapter_configs(self.model).get(self.config.adapter_name)
        return {} if config is None else json.loads(json.dumps(config.to_dict()))

    def _checkpoint(self, done: int) -> None:
        state = self.saver.training_state(self.model, self.optimizer)  # FSDP: every process
        if self.dist.is_main:
            extra = {
                "data_plan": self._plan_fields(),
                "epoch": done // self.batch_order.steps_per_epoch,
                "batch_in_epoch": done % self.batch_order.steps_per_epoch,
                "examples_seen": self.batch_order.examples_before(done),
                "training_config": self.config.to_dict(),
                "lora_config": self._lora_fields(),
            }
            if not self.decays_all:  # (absent: the older rule, which this run continues)
                extra[DECAY_RULE_KEY] = DECAY_RULE
            save_checkpoint(
                self.output_dir,
                done,
                self.model,
                self.optimizer,
                self.scheduler,
                extra,
                adapter_name=self.config.adapter_name,
                keep=self.config.keep_checkpoints,
                state=state,
            )
        self.dist.barrier()
