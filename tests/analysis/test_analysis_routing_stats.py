"""Routing statistics on logs whose routing is known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molf.analysis.routing_log import RoutingLog, read_routing_log
from molf.analysis.routing_stats import (
    focus_expert,
    focus_label,
    format_summary,
    score_log_ratio,
    share_by_layer,
    share_by_type,
    summarize,
    switches_per_module,
)


@pytest.fixture
def molf_log(tmp_path, write_routing_log):
    # 100 steps, 3 layers; attention always FFT, MLP FFT for steps < 50 then LoRA.
    return read_routing_log(write_routing_log(tmp_path / "log.jsonl", num_steps=100, num_layers=3))


def test_share_by_type(molf_log):
    shares = share_by_type(molf_log)
    assert list(shares.columns) == ["q", "k", "v", "o", "gate", "up", "down", "all"]
    assert (shares["q"] == 1.0).all()
    np.testing.assert_array_equal(shares["down"].to_numpy(), [1.0] * 50 + [0.0] * 50)
    assert shares["all"].iloc[-1] == pytest.approx(4 / 7)


def test_share_by_layer(molf_log):
    layers, share = share_by_layer(molf_log)
    np.testing.assert_array_equal(layers, [0, 1, 2])
    assert share.shape == (3, 100)
    np.testing.assert_allclose(share[:, 0], 1.0)
    np.testing.assert_allclose(share[:, -1], 4 / 7)


def test_switches_and_summary(molf_log):
    switches = switches_per_module(molf_log)
    assert switches.sum() == 3 * 3  # gate/up/down of 3 layers switch once each
    table = summarize(molf_log, tail_fraction=0.1)
    assert table.loc["q", "focus_pct_last"] == 100.0 and table.loc["q", "switches"] == 0
    assert table.loc["gate", "focus_pct_last"] == 0.0 and table.loc["gate", "switches"] == 3
    assert table.loc["all", "modules"] == 21
    text = format_summary(molf_log)
    assert "% FFT" in text and "gate" in text


def test_summary_tail_counts_only_the_tail(molf_log):
    # Over the last 60% of steps (40..99), MLP modules are on FFT for 10 of 60 steps.
    assert summarize(molf_log, tail_fraction=0.6).loc["up", "focus_pct_last"] == pytest.approx(100 * 10 / 60)
    with pytest.raises(ValueError, match="tail_fraction"):
        summarize(molf_log, tail_fraction=0.0)


def test_score_ratio(molf_log):
    ratio = score_log_ratio(molf_log)
    types = np.array(molf_log.module_types)
    np.testing.assert_allclose(ratio[:, types == "q"], np.log10(2.0))
    np.testing.assert_allclose(ratio[60:, types == "down"], -np.log10(2.0))


def test_molf_e_focus_is_highest_rank(tmp_path, write_routing_log):
    path = write_routing_log(tmp_path / "log.jsonl", num_steps=20, num_layers=1,
                             experts=("lora0_r32", "lora1_r128"), ranks=(32, 128))
    log = read_routing_log(path)
    assert focus_expert(log) == 1
    assert focus_label(log) == "lora1_r128 (highest-rank LoRA)"
    # The generator routes attention to expert 0 always: r128 share of q is 0.
    assert (share_by_type(log)["q"] == 0.0).all()
    assert "% lora1_r128" in format_summary(log)


def test_zero_scores_give_no_ratio(tmp_path):
    header = {"type": "header", "version": 1, "modules": ["model.layers.0.mlp.up_proj"], "experts": ["fft", "lora0_r8"],
              "ranks": [None, 8], "score_fn": "true_projected", "topk": 1, "every": 1}
    step = {"type": "step", "step": 0, "winners": [[0]], "scores": [[0.0, 0.0]]}
    path = tmp_path / "molf_routing.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(step) + "\n")
    assert np.isnan(score_log_ratio(read_routing_log(path))).all()


def test_summary_prints_switches_per_module_with_two_decimals():
    # Four up_proj modules over three steps: three switch once, one twice, 1.25 switches per module.
    modules = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    picks = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])  # (S, M) winning expert
    winners = np.eye(2, dtype=bool)[picks]  # (S, M, E)
    log = RoutingLog(steps=np.arange(3), modules=modules, experts=["fft", "lora0_r8"],
                     scores=np.where(winners, 2.0, 1.0), winners=winners, ranks=[None, 8])
    assert summarize(log).loc["up", "switches_per_module"] == 1.25
    lines = format_summary(log).splitlines()
    assert [line.split()[-1] for line in lines if line.split()[0] in ("up", "all")] == ["1.25", "1.25"]
