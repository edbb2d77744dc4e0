"""The routing-log writer: header once, full-precision scores, one whole line per step, resume truncation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from molf.analysis.routing_log import read_routing_log
from molf.train.callbacks import RunLogsCutter
from molf.train.routing_log import RoutingLogWriter, read_header, step_record, truncate_jsonl


@dataclass
class FakeDecision:
    scores: torch.Tensor
    winners: torch.Tensor
    module_names: list
    expert_names: list
    step: int


def decision(step: int, seed: int = 0) -> FakeDecision:
    g = torch.Generator().manual_seed(seed + step)
    scores = torch.rand(3, 2, generator=g) * 1e-7  # (M, E)
    scores[2, 1] = float("-inf")  # a module with fewer experts
    winners = torch.zeros(3, 2, dtype=torch.bool)
    winners[torch.arange(3), scores.argmax(1)] = True
    return FakeDecision(scores, winners, ["l.0.q_proj", "l.0.v_proj", "l.1.q_proj"], ["fft", "lora0_r8"], step)


def writer(path, every=1):
    return RoutingLogWriter(path, [None, 8], "true_projected", 1, every)


def test_header_then_steps_with_exact_scores(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    w = writer(path)
    decisions = [decision(s) for s in (1, 2)]
    for s, d in zip((1, 2), decisions):
        w.write(d, s)
    w.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"type": "header", "version": 1, "modules": decisions[0].module_names,
                        "experts": ["fft", "lora0_r8"], "ranks": [None, 8], "score_fn": "true_projected",
                        "topk": 1, "every": 1}
    assert [line["step"] for line in lines[1:]] == [1, 2]
    first = lines[1]
    assert first["scores"][0] == decisions[0].scores[0].tolist()  # fp32 values survive exactly
    assert first["scores"][2][1] is None  # -inf padding -> null
    assert first["winners"] == [[int(i)] for i in decisions[0].scores.argmax(1)]


def test_reopen_appends_without_second_header(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    w = writer(path)
    w.write(decision(1), 1)
    w.close()
    w = writer(path)
    w.write(decision(2), 2)
    w.close()
    kinds = [json.loads(line)["type"] for line in path.read_text().splitlines()]
    assert kinds == ["header", "step", "step"]


def test_truncate_after_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    w = writer(path)
    for s in range(1, 6):
        w.write(decision(s), s)
    w.close()
    with path.open("a") as handle:
        handle.write('{"type": "step", "step": 6, "winn')  # killed mid-write
    w = writer(path)
    w.truncate_after(3)
    w.write(decision(4, seed=100), 4)
    w.close()
    log = read_routing_log(path)
    assert log.steps.tolist() == [1, 2, 3, 4]
    assert log.scores[3, 0, 0] == pytest.approx(decision(4, seed=100).scores[0, 0].item(), rel=0)


def test_one_host_copy_per_step(monkeypatch):
    d = decision(1)
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    record = step_record(d, 1)
    assert len(calls) == 1 and record["step"] == 1


def test_truncate_jsonl_keeps_metrics_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "lo', encoding="utf-8")  # killed mid-write
    truncate_jsonl(path, 2)
    assert path.read_text(encoding="utf-8") == "".join(lines[:2])
    assert not path.with_suffix(".jsonl.tmp").exists()


def test_resumed_metrics_keep_one_end_of_training_summary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    finished = [{"step": 5, "loss": 0.5}, {"step": 6, "loss": 0.4},
                {"step": 6, "train_runtime": 3.0, "train_loss": 0.6}]
    path.write_text("".join(json.dumps(record) + "\n" for record in finished), encoding="utf-8")
    RunLogsCutter(tmp_path / "molf_routing.jsonl", path).on_train_begin(
        None, SimpleNamespace(is_world_process_zero=True, global_step=6), None)
    assert [json.loads(line) for line in path.read_text().splitlines()] == finished[:2]


def test_start_writes_the_header_before_any_step(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    w = writer(path, every=50)
    w.start(["l.0.q_proj"], ["fft", "lora0_r8"], step=0)
    w.close()  # a run shorter than the interval logs no step but still has its header
    header = read_header(path)
    assert header["modules"] == ["l.0.q_proj"] and header["every"] == 50
    log = read_routing_log(path)
    assert log.steps.tolist() == [] and log.experts == ["fft", "lora0_r8"]


def test_a_resume_at_another_interval_is_noted_in_the_header(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    w = writer(path, every=1)
    for s in (1, 2, 3):
        w.write(decision(s), s)
    w.close()
    w = writer(path, every=2)
    w.start(decision(1).module_names, decision(1).expert_names, step=3)
    w.write(decision(4), 4)
    w.close()
    w = writer(path, every=2)  # a second resume at the same interval adds nothing
    w.start(decision(1).module_names, decision(1).expert_names, step=4)
    w.close()
    header = read_header(path)
    assert header["every"] == 1 and header["every_changes"] == [[3, 2]]
    assert read_routing_log(path).steps.tolist() == [1, 2, 3, 4]
    # Resuming from an older checkpoint redoes the steps after it: the later change goes with them.
    w = writer(path, every=2)
    w.truncate_after(2)
    w.start(decision(1).module_names, decision(1).expert_names, step=2)
    w.close()
    header = read_header(path)
    assert header["every_changes"] == [[2, 2]] and read_routing_log(path).steps.tolist() == [1, 2]
    writer(path, every=1).truncate_after(1)
    assert "every_changes" not in read_header(path)


def test_the_cutter_cuts_logs_this_run_does_not_write(tmp_path):
    routing, metrics = tmp_path / "molf_routing.jsonl", tmp_path / "metrics.jsonl"
    w = writer(routing)
    for s in range(1, 6):
        w.write(decision(s), s)
    w.close()
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)), encoding="utf-8")
    RunLogsCutter(routing, metrics).on_train_begin(None, SimpleNamespace(is_world_process_zero=True,
                                                                         global_step=2), None)
    assert read_routing_log(routing).steps.tolist() == [1, 2]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    RunLogsCutter(routing, metrics).on_train_begin(None, SimpleNamespace(is_world_process_zero=False,
                                                                         global_step=1), None)
    assert read_routing_log(routing).steps.tolist() == [1, 2]  # rank 0 only
