"""Tokens/s, step time and peak memory, accumulated on the device and read only at logging steps."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import torch


def peak_memory_gb() -> float:
    """CUDA max allocated memory if CUDA is in use, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)
    except ImportError:  # not on Unix: current RSS is the best available
        import psutil

        return psutil.Process().memory_info().rss / 2**30


class ThroughputMeter:
    """Counts input tokens (attention mask) and label tokens (labels != -100) per micro-batch.

    Counts stay device tensors until ``read``; ``reduce`` (e.g. an all-reduce sum across ranks) is
    applied once per read, so throughput costs one host sync per logging step.

    The clock covers training only: after a read it restarts with the next micro-batch (so what runs
    between a log line and the next step, such as saving a checkpoint, is not counted), and the time
    between ``pause`` and ``resume`` (a checkpoint saved at a step that does not log) is left out.
    """

    def __init__(self) -> None:
        self._counts: Optional[torch.Tensor] = None  # (2,) int64: input tokens, label tokens
        self._since: Optional[float] = None
        self._since_step = 0
        self._paused_at: Optional[float] = None
        self._excluded = 0.0  # seconds between pause and resume since the clock started

    @property
    def started(self) -> bool:
        return self._since is not None

    def start(self, step: int) -> None:
        self._since, self._since_step, self._excluded, self._paused_at = time.perf_counter(), step, 0.0, None

    def pause(self) -> None:
        if self._since is not None and self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._excluded += time.perf_counter() - self._paused_at
            self._paused_at = None

    def update(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        tokens = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        label_tokens = (labels != -100).sum() if labels is not None else torch.zeros_like(tokens)
        counts = torch.stack([tokens, label_tokens]).long()  # (2,)
        self._counts = counts if self._counts is None else self._counts + counts

    def read(self, step: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Metrics since the previous read (or ``start``), then reset."""
        if self._counts is None or self._since is None or step <= self._since_step:
            return {}
        tokens, label_tokens = reduce(self._counts).tolist()  # the one host sync of this logging step
        self.resume()
        elapsed = time.perf_counter() - self._since - self._excluded
        metrics = {
            "tokens_per_second": tokens / elapsed,
            "label_tokens_per_second": label_tokens / elapsed,
            "step_time_s": elapsed / (step - self._since_step),
            "peak_memory_gb": peak_memory_gb(),
        }
        self._counts = None
        self._since, self._since_step = None, step  # restarted by the next micro-batch
        return metrics
