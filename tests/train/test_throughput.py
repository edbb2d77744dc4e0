"""ThroughputMeter: device-side counts, one reduce (and host copy) per read."""

from __future__ import annotations

import pytest
import torch

from molf.train.throughput import ThroughputMeter, peak_memory_gb


def batch(rows: int, length: int, pad: int, prompt: int) -> dict:
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, length - pad:] = 0
    labels = torch.randint(0, 10, (rows, length))
    labels[:, :prompt] = -100
    labels[:, length - pad:] = -100
    return {"input_ids": torch.zeros(rows, length, dtype=torch.long), "attention_mask": mask, "labels": labels}


def test_counts_input_and_label_tokens_and_reduces_once_per_read():
    meter = ThroughputMeter()
    meter.start(step=0)
    for _ in range(3):
        meter.update(batch(rows=2, length=10, pad=2, prompt=3))  # 8 input and 5 label tokens per row
    reduced = []

    def reduce(counts):
        reduced.append(counts.clone())
        return counts * 2  # as if a second rank saw the same

    metrics = meter.read(step=3, reduce=reduce)
    assert len(reduced) == 1 and reduced[0].tolist() == [48, 30]
    assert metrics["label_tokens_per_second"] / metrics["tokens_per_second"] == pytest.approx(30 / 48)
    assert metrics["step_time_s"] > 0 and 0 < metrics["peak_memory_gb"] <= peak_memory_gb()
    assert meter.read(step=3, reduce=reduce) == {}  # nothing new since the last read
    meter.update(batch(rows=1, length=4, pad=0, prompt=1))
    assert meter.read(step=4, reduce=lambda c: c)["tokens_per_second"] > 0
