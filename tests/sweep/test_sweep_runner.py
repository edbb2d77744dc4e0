"""Selecting jobs, detecting finished runs, and running a sweep locally (with a stand-in trainer)."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest

from molf.sweep import runner
from molf.sweep.grid import grid_jobs
from molf.sweep.runner import (
    RunPaths,
    completed_run_names,
    filter_jobs,
    is_done,
    job_config,
    launch_command,
    parse_indices,
    run_jobs,
)

# Stands in for src/script/train.py: parses the flags like the trainer and appends the result row.
FAKE_TRAIN = textwrap.dedent("""
    import csv, sys
    from pathlib import Path
    from molf.config import parse_config
    cfg = parse_config(sys.argv[1:])
    Path(cfg.results_dir).mkdir(parents=True, exist_ok=True)
    path = Path(cfg.results_dir) / f"{cfg.dataset_type}.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["run_name", "accuracy"])
        writer.writerow([cfg.run_name, 50.0])
""")


def test_parse_indices():
    assert parse_indices("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_indices("5", 10) == [5]
    with pytest.raises(ValueError, match="outside the grid"):
        parse_indices("8-12", 10)
    with pytest.raises(ValueError, match="bad index range"):
        parse_indices("a-b", 10)


def test_filter_jobs():
    jobs = grid_jobs("molf")
    selected = filter_jobs(jobs, ["task=med", "model=Qwen/Qwen2.5-1.5B", "lr=5e-5"])
    assert len(selected) == 2 * 2  # LoRA lrs x schedules
    assert all(j.flags["dataset_type"] == "med" and j.flags["learning_rate"] == 5e-5 for j in selected)
    assert filter_jobs(jobs, ["scheduler=linear", "lora_lr=0.0005"])[0].flags["lr_scheduler_type"] == "linear"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        filter_jobs(jobs, ["med"])
    with pytest.raises(ValueError, match="no job of this grid has the flag"):
        filter_jobs(jobs, ["lora_rank=32"])


def test_launch_command():
    command = launch_command(["--mode", "fft"], "torchrun", nproc=2, port=12345)
    assert command[:5] == ["torchrun", "--nnodes", "1", "--nproc_per_node=2", "--master_port=12345"]
    assert command[-3:] == ["src/script/train.py", "--mode", "fft"]
    assert launch_command(["--mode", "fft"])[0] == sys.executable
    with pytest.raises(ValueError, match="launcher"):
        launch_command([], "srun")


def test_done_detection(tmp_path):
    paths = RunPaths(str(tmp_path / "ckpts"), str(tmp_path / "logs"), str(tmp_path / "results"))
    job = grid_jobs("lora")[4]
    assert completed_run_names(paths.results_dir, job.task) == set()
    assert not is_done(job, paths)
    (tmp_path / "results").mkdir()
    with (tmp_path / "results" / f"{job.task}.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["run_name", "accuracy"], [job_config(job, paths).run_name, 1.0]])
    assert is_done(job, paths)
    assert not is_done(grid_jobs("lora")[5], paths)
    assert not is_done(job, paths, world_size=2)  # the same flags on two GPUs are another run
    with (tmp_path / "results" / f"{job.task}.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow([job_config(job, paths).run_name_for(2), 1.0])
    assert is_done(job, paths, world_size=2)


def test_a_row_cut_inside_a_quoted_field_does_not_hide_the_next_run(tmp_path):
    paths = RunPaths(str(tmp_path / "ckpts"), str(tmp_path / "logs"), str(tmp_path / "results"))
    job = grid_jobs("lora")[4]
    (tmp_path / "results").mkdir()
    name = job_config(job, paths).run_name
    # The appender's layout: a killed writer's row, cut inside a quote, then the next row on its own line.
    (tmp_path / "results" / f"{job.task}.csv").write_text(
        f'run_name,other_hparams,accuracy\nother,"{{""da\n{name},"{{}}",0.5\n', encoding="utf-8")
    assert completed_run_names(paths.results_dir, job.task) == {name}
    assert is_done(job, paths)


@pytest.mark.parametrize("row, done", [
    ({"accuracy": "0.5", "num_eval_samples": ""}, True),
    ({"accuracy": "", "num_eval_samples": ""}, False),  # no metric: a row cut short by a killed writer
    ({"accuracy": "nan", "num_eval_samples": ""}, False),
    ({"accuracy": "0.5", "num_eval_samples": "200"}, False),  # a subset evaluation does not finish a full one
])
def test_only_a_complete_row_of_the_same_evaluation_marks_a_job_done(tmp_path, row, done):
    paths = RunPaths(str(tmp_path / "ckpts"), str(tmp_path / "logs"), str(tmp_path / "results"))
    job = grid_jobs("lora")[4]
    (tmp_path / "results").mkdir()
    with (tmp_path / "results" / f"{job.task}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["run_name", "num_eval_samples", "accuracy"])
        writer.writeheader()
        writer.writerow({"run_name": job_config(job, paths).run_name, **row})
    assert is_done(job, paths) is done
    subset = ["--num_eval_samples", "200"]
    assert is_done(job, paths, subset) is (done is False and row["accuracy"] == "0.5")


def test_a_filter_value_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="task=medd matches no job.*dataset_type takes \\['fact', 'med', 'sql'\\]"):
        filter_jobs(grid_jobs("molf"), ["task=medd"])


def test_index_ranges_and_boolean_filters():
    assert parse_indices("0-2,5", 10) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="is empty: write the lower index first, e.g. 1-3"):
        parse_indices("3-1", 10)
    jobs = grid_jobs("molf")
    assert filter_jobs(jobs, ["use_rslora=true"]) == filter_jobs(jobs, ["use_rslora=True"]) == jobs


def test_run_resume_and_dry_run(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(runner, "TRAIN_SCRIPT", str(script))
    paths = RunPaths(str(tmp_path / "ckpts"), str(tmp_path / "logs"), str(tmp_path / "results"))
    jobs = filter_jobs(grid_jobs("fft"), ["task=med", "model=Qwen/Qwen2.5-1.5B", "scheduler=cosine", "lr=5e-5"])

    assert run_jobs(jobs, paths, dry_run=True) == {"ran": [], "skipped": [], "failed": []}
    assert str(script) in capsys.readouterr().out and not (tmp_path / "results").exists()

    first = run_jobs(jobs, paths)
    assert first == {"ran": [j.index for j in jobs], "skipped": [], "failed": []}
    assert completed_run_names(paths.results_dir, "med") == {job_config(jobs[0], paths).run_name}
    again = run_jobs(jobs, paths)
    assert again == {"ran": [], "skipped": [j.index for j in jobs], "failed": []}


def test_failure_stops_unless_keep_going(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(runner, "TRAIN_SCRIPT", str(script))
    paths = RunPaths(str(tmp_path / "c"), str(tmp_path / "l"), str(tmp_path / "r"))
    jobs = grid_jobs("lora")[:2]
    assert run_jobs(jobs, paths)["failed"] == [0]
    assert run_jobs(jobs, paths, keep_going=True)["failed"] == [0, 1]


def test_relative_output_folders_are_those_of_the_directory_the_sweep_starts_in(tmp_path):
    # Jobs run in the repository root; a relative --results_dir must still name the folder under the
    # caller's directory, for the jobs and for the finished-job check alike.
    import subprocess
    from pathlib import Path

    from molf.eval.results import TASK_METRICS

    repo = Path(__file__).resolve().parents[2]
    job = grid_jobs("fft")[0]
    done = job_config(job, RunPaths(str(tmp_path / "ck"), str(tmp_path / "logs"), str(tmp_path / "res")))
    (tmp_path / "res").mkdir()
    with open(tmp_path / "res" / f"{job.task}.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["run_name", TASK_METRICS[job.task][0]], [done.run_name, "50.0"]])
    result = subprocess.run([sys.executable, str(repo / "scripts" / "sweep.py"), "--grid", "fft", "--run", "--dry_run",
                             "--indices", "0-1", "--results_dir", "res", "--ckpt_dir_root", "ck", "--log_dir_root",
                             "logs"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert "fft #0: result row exists, skipping" in first
    assert f"--results_dir {tmp_path / 'res'}" in second and f"--ckpt_dir_root {tmp_path / 'ck'}" in second
