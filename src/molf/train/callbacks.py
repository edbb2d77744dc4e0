"""Trainer callbacks: the routing log and the JSON metrics file (``--report_to json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import TrainerCallback

from molf.train.routing_log import RoutingLogWriter, truncate_jsonl, truncate_routing_log

METRICS_FILENAME = "metrics.jsonl"


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class RoutingLogCallback(TrainerCallback):
    """Writes ``MoLFAdamW.last_routing`` to the routing log every ``every`` optimizer steps, rank 0 only.

    The ``step`` of a line is the trainer's ``global_step`` after the optimizer step that made the
    decision (1 for the first step), so a checkpoint ``checkpoint-N`` covers lines up to ``N``.
    """

    def __init__(self, path: Path, ranks: Sequence[Optional[int]], score_fn: str, topk: int, every: int) -> None:
        self.every = every
        self.writer = RoutingLogWriter(path, ranks, score_fn, topk, every)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # RunLogsCutter (listed before this callback) has cut a resumed run's log back to its checkpoint.
        torch_optimizer = unwrap_optimizer(optimizer)
        if state.is_world_process_zero and hasattr(torch_optimizer, "module_names"):
            self.writer.start(torch_optimizer.module_names, torch_optimizer.expert_names, state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not state.is_world_process_zero or state.global_step % self.every != 0:
            return
        decision = getattr(unwrap_optimizer(optimizer), "last_routing", None)
        if decision is not None:
            self.writer.write(decision, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.writer.close()


class RunLogsCutter(TrainerCallback):
    """Cuts the run's JSONL logs (routing log, ``metrics.jsonl``) back to the step training starts
    from, rank 0 only, whether or not this run writes them: a resumed run logs the steps after its
    checkpoint afresh, and no line of the killed run's later steps stays behind.

    Args:
        routing_log: the run's routing log path.
        metrics: the run's metrics file path.
    """

    def __init__(self, routing_log: Path, metrics: Path) -> None:
        self.routing_log = Path(routing_log)
        self.metrics = Path(metrics)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            truncate_routing_log(self.routing_log, state.global_step)
            # The end-of-training summary of a finished run resumed from its last checkpoint is
            # written again at the end; keep one.
            truncate_jsonl(self.metrics, state.global_step, drop=lambda record: "train_runtime" in record)


class JsonMetricsCallback(TrainerCallback):
    """Appends every log dict (with its ``step``) as one line of ``<run_dir>/metrics.jsonl``, rank 0 only.

    A resumed run's file has been cut back to its checkpoint's step by ``RunLogsCutter``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
