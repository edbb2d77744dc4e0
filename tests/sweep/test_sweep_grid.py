"""The paper's grids: sizes, deterministic indices, and every job parses into a TrainingConfig."""

from __future__ import annotations

import warnings

import draccus
import pytest

from molf.config import TrainingConfig
from molf.sweep.grid import BASE_GRIDS, GRID_NAMES, format_flag_value, grid_jobs
from molf.sweep.runner import RunPaths, train_args


def test_grid_sizes_follow_the_appendix():
    sizes = {name: len(grid_jobs(name)) for name in GRID_NAMES}
    # 3 models x 3 tasks x 2 schedules x lrs: FFT 3, LoRA 2, MoLF 3 x 2, MoLF-E 2.
    assert sizes == {"fft": 54, "lora": 36, "molf": 108, "molf_e": 36, "paper": 234}
    assert [len(g) for g in BASE_GRIDS] == [54, 36, 108, 36]


def test_indices_are_deterministic_and_distinct():
    jobs = grid_jobs("paper")
    assert [j.index for j in jobs] == list(range(len(jobs)))
    assert [j.flags for j in jobs] == [j.flags for j in grid_jobs("paper")]
    assert len({tuple(j.args()) for j in jobs}) == len(jobs)
    # The first axis (model) varies slowest, the scheduler fastest.
    fft = grid_jobs("fft")
    assert fft[0].flags["lr_scheduler_type"] == "cosine" and fft[1].flags["lr_scheduler_type"] == "linear"
    assert fft[0].flags["model_name_or_path"] == "google/gemma-3-1b-pt"
    assert fft[-1].flags["model_name_or_path"] == "Qwen/Qwen2.5-3B"


def test_shared_settings():
    for job in grid_jobs("paper"):
        flags = job.flags
        assert (flags["per_device_batch_size"], flags["gradient_accumulation_steps"]) == (8, 4)
        assert (flags["num_train_epochs"], flags["warm_up_ratio"]) == (2, 0.1)
        assert flags["lr_scheduler_type"] in ("cosine", "linear")
    molf = ({j.flags["learning_rate"] for j in grid_jobs("molf")},
            {j.flags["lora_learning_rate"] for j in grid_jobs("molf")})
    assert molf == ({1e-4, 5e-5, 2e-5}, {5e-4, 5e-5})
    assert {tuple(j.flags["molf_lora_ranks"]) for j in grid_jobs("molf_e")} == {(32, 128)}
    assert {j.flags["lora_rank"] for j in grid_jobs("lora")} == {32}


def test_flag_formatting():
    assert format_flag_value(5e-05) == "5e-05"
    assert format_flag_value(0.0001) == "0.0001"
    assert format_flag_value([32, 128]) == "[32,128]"
    assert format_flag_value(True) == "True"
    with pytest.raises(ValueError, match="unknown grid"):
        grid_jobs("nope")


def test_every_array_index_parses_into_a_training_config():
    paths = RunPaths("ckpts", "logs", "results")
    run_names = set()
    for job in grid_jobs("paper"):
        with warnings.catch_warnings():
            # A warning here means a grid flag is ignored in that mode: the grid would be wrong.
            warnings.simplefilter("error")
            config = draccus.parse(TrainingConfig, args=train_args(job, paths))
        assert config.mode == job.flags["mode"]
        assert config.model_name_or_path == job.flags["model_name_or_path"]
        assert config.dataset_type == job.flags["dataset_type"]
        assert config.lr_scheduler_type == job.flags["lr_scheduler_type"]
        for name in ("learning_rate", "lora_learning_rate", "molf_lora_ranks", "lora_rank"):
            if name in job.flags:
                assert getattr(config, name) == job.flags[name], (job.index, name)
        assert config.results_dir == "results"
        run_names.add(config.run_name)
    assert len(run_names) == len(grid_jobs("paper")), "two jobs share a run name: they would overwrite each other"
