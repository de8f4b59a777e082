"""The end of a training run (``lorakit.train.loop._Run`` inherits ``RunFinish``) and what it
returns (``TrainResult``): the last evaluation, if the last step had none; the final adapter
(gathered by every process under FSDP, written by process 0: ``output_dir.write_final_adapter``)
and the loss curve; then every process waits for the others, and one whose write failed raises.

The run's state this reads: ``model``, ``config``, ``dist``, ``output_dir``, ``saver``,
``metrics``, ``eval_data``, ``total_steps``, ``last_loss``, ``last_eval``, ``last_eval_step``,
and the loop's ``_evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorakit.train.metrics import plot_loss_curve, read_metrics
from lorakit.train.output_dir import write_final_adapter

__all__ = ["RunFinish", "TrainResult"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    steps: int
    final_loss: float | None
    output_dir: Path
    metrics_path: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    loss_curve: Path | None = None
    resumed_from: int = 0


class RunFinish:
    """The end of ``lorakit.train.loop._Run`` (see the module docstring)."""

    def _finish(self, start_step: int) -> TrainResult:
        # (evaluated at the last step: by eval_every, or before a finished run was resumed)
        if self.eval_data and self.last_eval_step != self.total_steps:
            self._evaluate(self.total_steps)
        result = TrainResult(
            steps=self.total_steps,
            final_loss=self.last_loss,
            output_dir=self.output_dir,
            metrics_path=self.metrics.path,
            eval_metrics=self.last_eval,
            resumed_from=start_step,
        )
        write_adapter = self.saver.adapter_writer(self.model)  # FSDP: gathered by every process
        failure = None
        if self.dist.is_main:
            result.adapter_dir = self.output_dir / "adapter"
            failure = write_final_adapter(write_adapter, result.adapter_dir, self.output_dir)
            if self.config.plot and failure is None:
                records = read_metrics(self.metrics.path)
                result.loss_curve = plot_loss_curve(records, self.output_dir / "loss_curve.png")
        self.dist.barrier()  # (every process, the one that failed too)
        if failure is not None:
            raise failure
        self.model.eval()
        return result
