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
    assert not meter.started  # the trainer restarts the clock with the next micro-batch
    meter.start(step=3)
    meter.update(batch(rows=1, length=4, pad=0, prompt=1))
    assert meter.read(step=4, reduce=lambda c: c)["tokens_per_second"] > 0


def test_time_between_pause_and_resume_and_after_a_read_is_not_counted(monkeypatch):
    import molf.train.throughput as throughput

    now = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])
    meter = ThroughputMeter()
    meter.start(step=0)
    meter.update(batch(rows=1, length=10, pad=0, prompt=0))
    now[0] = 1.0
    meter.pause()  # a checkpoint is written from t=1 to t=3
    now[0] = 3.0
    meter.resume()
    now[0] = 4.0
    metrics = meter.read(step=2, reduce=lambda c: c)
    assert metrics["step_time_s"] == pytest.approx(1.0) and metrics["tokens_per_second"] == pytest.approx(5.0)
    now[0] = 10.0  # saving and anything else between the log line and the next micro-batch
    meter.start(step=2)
    meter.update(batch(rows=1, length=10, pad=0, prompt=0))
    now[0] = 12.0
    meter.pause()  # a pause still open at the read ends there
    now[0] = 13.0
    assert meter.read(step=3, reduce=lambda c: c)["step_time_s"] == pytest.approx(2.0)
