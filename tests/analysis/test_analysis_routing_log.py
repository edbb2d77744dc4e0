"""Reading routing logs: our format, the reference format, truncation, resumed runs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from molf.analysis.routing_log import load_routing_log, module_layer, module_type, read_routing_log

FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "analysis"


def test_module_name_parsing():
    assert module_layer("model.layers.3.self_attn.q_proj") == 3
    assert module_layer("model.layers.27.mlp.down_proj") == 27
    assert module_layer("transformer.h.11.attn.c_attn") == 11
    assert module_layer("lm_head") == -1
    assert module_type("model.layers.3.self_attn.q_proj") == "q"
    assert module_type("model.layers.3.mlp.gate_proj") == "gate"
    assert module_type("transformer.h.1.mlp.c_fc") == "c_fc"


def test_ours_fixture_to_frame():
    frame = load_routing_log(FIXTURES / "routing_ours.jsonl")
    assert list(frame.columns) == ["step", "module", "layer", "module_type", "expert", "score", "winner"]
    assert len(frame) == 4 * 4 * 2
    assert frame.attrs["score_fn"] == "true_projected" and frame.attrs["topk"] == 1
    assert frame.attrs["experts"] == ["fft", "lora0_r128"]
    row = frame[(frame.step == 1) & (frame.module == "model.layers.0.mlp.down_proj") & (frame.expert == "lora0_r128")]
    assert row.layer.item() == 0 and row.module_type.item() == "down"
    assert row.score.item() == pytest.approx(1e-06) and row.winner.item()
    # One winner per (step, module) with K=1.
    assert (frame.groupby(["step", "module"], observed=True).winner.sum() == 1).all()
    # null scores become NaN.
    nulls = frame[(frame.step == 2) & (frame.module == "model.layers.1.mlp.down_proj")]
    assert nulls.score.isna().all()


def test_reference_format_matches_ours():
    log = read_routing_log(FIXTURES / "routing_reference.jsonl")
    assert log.meta["format"] == "reference"
    assert log.experts == ["fft", "lora_r128"]
    assert log.ranks == [None, 128]
    assert log.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    # Step 2 uses list scores and index winners; they map onto the names seen before.
    np.testing.assert_array_equal(log.winners[:, :, 1], [[False, False], [False, True], [True, True]])
    np.testing.assert_allclose(log.scores[2], [[1e-06, 4e-06], [1e-07, 2e-06]])


def test_reference_list_scores_get_given_names(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text(json.dumps({"step": 5, "selections": {"model.layers.2.mlp.up_proj": {
        "winners": [0], "scores": [3.0, 1.0]}}}) + "\n")
    assert read_routing_log(path).experts == ["expert0", "expert1"]
    assert read_routing_log(path, experts=["fft", "lora0_r64"]).experts == ["fft", "lora0_r64"]


def test_run_directory_and_truncated_last_line(tmp_path):
    text = (FIXTURES / "routing_ours.jsonl").read_text()
    (tmp_path / "molf_routing.jsonl").write_text(text + '{"type": "step", "step": 4, "winners": [[0], [')
    with pytest.warns(UserWarning, match="truncated last line"):
        log = read_routing_log(tmp_path)
    np.testing.assert_array_equal(log.steps, [0, 1, 2, 3])


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    lines = (FIXTURES / "routing_ours.jsonl").read_text().splitlines()
    lines.insert(2, '{"type": "step", "st')
    path = tmp_path / "molf_routing.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=":3: not a JSON record"):
        read_routing_log(path)


def test_resumed_run_keeps_last_record_of_a_step(tmp_path):
    lines = (FIXTURES / "routing_ours.jsonl").read_text().splitlines()
    redo = json.loads(lines[2])  # step 1 again, after a resume from step 0, with other winners
    redo["winners"] = [[1], [1], [1], [1]]
    path = tmp_path / "molf_routing.jsonl"
    path.write_text("\n".join(lines[:3] + [json.dumps(redo)] + lines[3:]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = read_routing_log(path)
    np.testing.assert_array_equal(log.steps, [0, 1, 2, 3])
    assert log.winners[1, :, 1].all()


def test_ragged_winners_top2(tmp_path):
    header = {"type": "header", "version": 1, "modules": ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
              "experts": ["fft", "lora0_r32", "lora1_r128"], "ranks": [None, 32, 128], "score_fn": "projected",
              "topk": 2, "every": 1}
    step = {"type": "step", "step": 0, "winners": [[0, 2], [1]], "scores": [[3.0, 1.0, 2.0], [1.0, 2.0]]}
    path = tmp_path / "molf_routing.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(step) + "\n")
    log = read_routing_log(path)
    np.testing.assert_array_equal(log.winners[0], [[True, False, True], [False, True, False]])
    assert np.isnan(log.scores[0, 1, 2])


def test_not_a_routing_log(tmp_path):
    path = tmp_path / "molf_routing.jsonl"
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="neither a header"):
        read_routing_log(path)
    with pytest.raises(FileNotFoundError, match="no routing log"):
        read_routing_log(tmp_path / "missing")


def test_multi_thousand_step_log(tmp_path, write_routing_log):
    path = write_routing_log(tmp_path / "molf_routing.jsonl", num_steps=3000, num_layers=28)
    log = read_routing_log(path)
    assert log.scores.shape == (3000, 196, 2)
    frame = log.to_frame()
    assert len(frame) == 3000 * 196 * 2
    late_mlp = frame[(frame.step >= 1500) & (frame.module_type == "gate") & frame.winner]
    assert (late_mlp.expert == "lora0_r128").all() and len(late_mlp) == 1500 * 28


def test_round_trip_with_the_trainer_writer(tmp_path):
    from types import SimpleNamespace

    import torch

    from molf.train.routing_log import RoutingLogWriter

    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    experts = ["fft", "lora0_r128"]
    writer = RoutingLogWriter(tmp_path / "molf_routing.jsonl", ranks=[None, 128], score_fn="true_projected",
                              topk=1, every=1)
    written = []
    for step in range(6):
        scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(step))  # (M, E)
        scores[1, 1] = float("-inf") if step == 3 else scores[1, 1]
        winners = torch.zeros(2, 2, dtype=torch.bool)
        winners[torch.arange(2), scores.argmax(dim=1)] = True
        writer.write(SimpleNamespace(scores=scores, winners=winners, module_names=modules, expert_names=experts), step)
        written.append((scores.double().numpy(), winners.numpy()))
    writer.close()

    log = read_routing_log(tmp_path)
    assert log.modules == modules and log.experts == experts and log.ranks == [None, 128]
    np.testing.assert_array_equal(log.steps, np.arange(6))
    expected_scores = np.stack([s for s, _ in written])
    expected_scores[~np.isfinite(expected_scores)] = np.nan
    np.testing.assert_allclose(log.scores, expected_scores, rtol=1e-6)
    np.testing.assert_array_equal(log.winners, np.stack([w for _, w in written]))


def _two_module_log(path, step: dict):
    header = {"type": "header", "version": 1, "modules": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
              "experts": ["fft", "lora0_r8"], "ranks": [None, 8], "score_fn": "true_projected", "topk": 1, "every": 1}
    good = {"type": "step", "step": 0, "winners": [[0], [1]], "scores": [[2.0, 1.0], [1.0, 2.0]]}
    path.write_text("\n".join(json.dumps(r) for r in (header, good, {"type": "step", "step": 1, **step})) + "\n")
    return path


@pytest.mark.parametrize("step, reason", [
    ({"winners": [[0], [1]], "scores": [[2.0, 1.0]]}, "'scores' has 1 rows, the header names 2 modules"),
    ({"winners": [[0, 1]], "scores": [[2.0, 1.0], [1.0, 2.0]]}, "'winners' has 1 rows, the header names 2 modules"),
    ({"winners": [[0], [-1]], "scores": [[2.0, 1.0], [1.0, 2.0]]}, "'winners' holds expert index -1"),
    ({"winners": [[0], [0, -1]], "scores": [[2.0, 1.0], [1.0, 2.0]]}, "'winners' holds expert index -1"),
    ({"winners": [[0], [2]], "scores": [[2.0, 1.0], [1.0, 2.0]]}, "'winners' holds expert index 2"),
    ({"winners": [[0], [1]], "scores": [[2.0, 1.0], [1.0, 2.0, 3.0]]}, "'scores' of module 1 has 3 values"),
])
def test_malformed_step_records_are_refused(tmp_path, step, reason):
    path = _two_module_log(tmp_path / "molf_routing.jsonl", step)
    with pytest.raises(ValueError, match=f":3: malformed step record .*{reason}"):
        read_routing_log(path)


def test_a_short_score_row_is_not_broadcast(tmp_path):
    # One score per module for two experts: the second expert has no score (NaN), not a copy of the first.
    log = read_routing_log(_two_module_log(tmp_path / "molf_routing.jsonl",
                                           {"winners": [[0], [0]], "scores": [[2.0], [3.0]]}))
    np.testing.assert_array_equal(log.scores[1, :, 0], [2.0, 3.0])
    assert np.isnan(log.scores[1, :, 1]).all()


def test_reference_negative_winner_is_refused(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text(json.dumps({"step": 5, "selections": {"model.layers.2.mlp.up_proj": {
        "winners": [-1], "scores": [3.0, 1.0]}}}) + "\n")
    with pytest.raises(ValueError, match=":1: malformed step record .*negative expert index -1"):
        read_routing_log(path)
