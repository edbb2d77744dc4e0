"""Tokens/s, step time and peak memory, accumulated on the device and read only at logging steps."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch


def peak_memory_gb() -> float:
    """CUDA max allocated memory if CUDA is in use, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # not on Unix: current RSS is the best available
        import psutil

        return psutil.Process().memory_info().rss / 2**30


class ThroughputMeter:
    """Counts input tokens (attention mask) and label tokens (labels != -100) per micro-batch.

    Counts stay device tensors until ``read``; ``reduce`` (e.g. an all-reduce sum across ranks) is
    applied once per read, so throughput costs one host sync per logging step.
    """

    def __init__(self) -> None:
        self._counts: Optional[torch.Tensor] = None  # (2,) int64: input tokens, label tokens
        self._since: Optional[float] = None
        self._since_step = 0

    @property
    def started(self) -> bool:
        return self._since is not None

    def start(self, step: int) -> None:
        self._since, self._since_step = time.perf_counter(), step

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
        elapsed = time.perf_counter() - self._since
        metrics = {
            "tokens_per_second": tokens / elapsed,
            "label_tokens_per_second": label_tokens / elapsed,
            "step_time_s": elapsed / (step - self._since_step),
            "peak_memory_gb": peak_memory_gb(),
        }
        self._counts = None
        self.start(step)
        return metrics
