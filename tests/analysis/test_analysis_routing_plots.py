"""Routing figures are written for MoLF and MoLF-E logs, long ones included, and by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from molf.analysis.routing_log import read_routing_log
from molf.analysis.routing_plots import FIGURES, plot_routing, step_columns, step_edges

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_pngs(paths, out_dir):
    assert sorted(p.name for p in paths) == sorted(FIGURES)
    for path in paths:
        assert path.parent == out_dir
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_multi_thousand_step_log(tmp_path, write_routing_log):
    log = read_routing_log(write_routing_log(tmp_path / "log.jsonl", num_steps=3000, num_layers=28))
    out_dir = tmp_path / "figs"
    _assert_pngs(plot_routing(log, out_dir), out_dir)


def test_molf_e_log(tmp_path, write_routing_log):
    path = write_routing_log(tmp_path / "log.jsonl", num_steps=50, num_layers=2,
                             experts=("lora0_r32", "lora1_r128"), ranks=(32, 128))
    out_dir = tmp_path / "figs"
    _assert_pngs(plot_routing(read_routing_log(path), out_dir), out_dir)


def test_reference_log_single_step_modules(tmp_path):
    log = read_routing_log(REPO_ROOT / "tests" / "fixtures" / "analysis" / "routing_reference.jsonl")
    _assert_pngs(plot_routing(log, tmp_path), tmp_path)


def test_empty_log_is_refused(tmp_path):
    header = '{"type": "header", "version": 1, "modules": ["m.layers.0.q_proj"], "experts": ["fft", "lora0_r8"], ' \
             '"ranks": [null, 8], "score_fn": "true_projected", "topk": 1, "every": 1}\n'
    (tmp_path / "molf_routing.jsonl").write_text(header)
    with pytest.raises(ValueError, match="no logged steps"):
        plot_routing(read_routing_log(tmp_path), tmp_path / "figs")


def test_cli_writes_figures_and_summary(tmp_path, write_routing_log):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_routing_log(run_dir / "molf_routing.jsonl", num_steps=40, num_layers=2)
    out_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "plot_routing.py"), str(run_dir),
                             "-o", str(out_dir)], capture_output=True, text=True, check=True)
    assert "% FFT" in result.stdout and "gate" in result.stdout
    assert (out_dir / "routing_summary.txt").read_text().startswith("Routing summary")
    assert {p.name for p in out_dir.glob("*.png")} == set(FIGURES)


def test_single_step_log_plots_without_warnings(tmp_path):
    header = {"type": "header", "version": 1, "modules": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
              "experts": ["fft", "lora0_r8"], "ranks": [None, 8], "score_fn": "true_projected", "topk": 1, "every": 1}
    step = {"type": "step", "step": 7, "winners": [[0], [1]], "scores": [[2.0, 1.0], [1.0, 2.0]]}
    (tmp_path / "molf_routing.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(step) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a zero-width extent
        paths = plot_routing(read_routing_log(tmp_path), tmp_path / "figs")
    _assert_pngs(paths, tmp_path / "figs")
    assert step_edges(np.array([7])).tolist() == [6.5, 7.5]
    assert step_edges(np.array([10, 20, 30])).tolist() == [5, 15, 25, 35]


def test_heatmap_columns_sit_at_their_steps_when_the_logging_interval_changes():
    # Steps 1-10 logged every step (FFT), then 20..1000 every 20 (LoRA): a resume with another interval.
    steps = np.concatenate([np.arange(1, 11), np.arange(20, 1001, 20)])
    share = (steps <= 10).astype(np.float64)[None, :]  # (1 layer, S) FFT share
    columns, edges = step_columns(share, steps)
    assert columns.shape == (1, len(steps)) and edges.tolist()[:3] == [0.5, 1.5, 2.5]
    assert edges[10] == 15.0 and edges[-1] == 1010.0  # step 10's column ends halfway to step 20
    # Over the column budget, columns have equal step width and average the steps inside them.
    steps = np.concatenate([np.arange(1, 301), np.arange(320, 3001, 20)])
    share = (steps <= 150).astype(np.float64)[None, :]
    columns, edges = step_columns(share, steps)
    assert columns.shape == (1, 200) and np.allclose(np.diff(edges), np.diff(edges)[0])
    centres = (edges[:-1] + edges[1:]) / 2
    full = np.isfinite(columns[0])
    assert np.all(columns[0][full & (centres < 140)] == 1.0) and np.all(columns[0][full & (centres > 160)] == 0.0)
