"""src/script/train.py and count_params.py end to end on CPU (tiny model, bundled MedMCQA fixture)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REPO_ROOT
from transformers import AutoModelForCausalLM

TINY = "tiny-qwen2:hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "src" / "script" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", TINY, "--mode", "molf", "--molf_lora_ranks", "[8]", "--dataset_type", "med",
            "--data_path", str(FIXTURES / "med"), "--eval_data_path", str(FIXTURES / "med"),
            "--ckpt_dir_root", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"),
            "--max_steps", "3", "--per_device_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--learning_rate", "1e-3", "--lora_learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "2", "--report_to", "json", "--num_eval_samples", "4",
            "--max_new_tokens", "3", "--eval_batch_size", "4", *extra]


def test_validate_only_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_script("train").main(flags(tmp_path, "--validate_only", "True")) == 0
    assert "config is valid" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_invalid_flags_exit_2_with_the_fix(tmp_path, capsys):
    assert load_script("train").main(flags(tmp_path, "--molf_topk", "5")) == 2
    assert "lower --molf_topk" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, expected", [
    (("--precision", "fp16"), "error: argument --precision: invalid choice: 'fp16' (choose from"),
    (("--molf_score_fn", "foo"), "error: argument --molf_score_fn: invalid choice: 'foo'"),
    (("--bogus_flag", "1"), "error: unrecognized arguments: --bogus_flag 1 (--help lists every flag)"),
])
def test_a_bad_choice_or_unknown_flag_is_one_error_line_not_the_usage(tmp_path, capsys, extra, expected):
    for script in ("train", "count_params"):
        assert load_script(script).main(flags(tmp_path, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1 and "usage:" not in err, err


def test_molf_traceback_shows_where_a_flag_error_was_raised(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOLF_TRACEBACK", "1")
    with pytest.raises(ValueError, match="lower --molf_topk"):
        load_script("train").main(flags(tmp_path, "--molf_topk", "5"))
    assert not (tmp_path / "runs").exists()


def test_missing_data_path_exits_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    script = load_script("train")
    monkeypatch.setattr(script, "train", lambda cfg: pytest.fail("train() ran despite a missing data path"))
    missing = tmp_path / "nowhere.jsonl"
    argv = flags(tmp_path)
    argv[argv.index("--data_path") + 1] = str(missing)
    assert script.main(argv) == 2
    assert f"--data_path {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_preflight_prints_counts_and_trains_nothing(tmp_path, capsys):
    assert load_script("train").main(flags(tmp_path, "--preflight", "True")) == 0
    out = capsys.readouterr().out
    assert "lora_experts" in out and "added by the mode" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_train_merge_save_evaluate_then_only_eval(tmp_path, capsys):
    script = load_script("train")
    assert script.main(flags(tmp_path)) == 0
    out = capsys.readouterr().out
    run_dir = next((tmp_path / "runs").iterdir())
    assert f"merged checkpoint: {run_dir / 'final'}" in out
    assert f"routing log: {run_dir / 'molf_routing.jsonl'}" in out
    assert "CPU training: large freed blocks are kept for reuse" in out  # glibc CI machines
    assert (run_dir / "resolved_config.yaml").is_file()
    assert not list(run_dir.glob("checkpoint-*"))  # clean_ckpt_at_end
    steps = [json.loads(line) for line in (run_dir / "molf_routing.jsonl").read_text().splitlines()]
    assert steps[0]["type"] == "header" and [s["step"] for s in steps[1:]] == [1, 2, 3]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert torch.isfinite(next(model.parameters())).all()
    rows = list(csv.DictReader(open(tmp_path / "results" / "med.csv")))
    assert len(rows) == 1 and rows[0]["run_name"] == run_dir.name and rows[0]["num_eval"] == "4"
    assert script.main(flags(tmp_path, "--only_eval", "True")) == 0
    assert len(list(csv.DictReader(open(tmp_path / "results" / "med.csv")))) == 2
    capsys.readouterr()
    final_files = sorted(p.name for p in (run_dir / "final").iterdir())
    assert script.main(flags(tmp_path)) == 2  # the same run again: refused before a model is loaded
    assert "already holds this run (final, molf_routing.jsonl, metrics.jsonl)" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == final_files


@pytest.mark.integration
def test_a_resubmitted_run_that_died_evaluating_is_evaluated_not_retrained(tmp_path, capsys, monkeypatch):
    script = load_script("train")
    assert script.main(flags(tmp_path, "--do_eval", "False")) == 0  # trained and saved, no row yet
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "final.partial").exists() and not (tmp_path / "results" / "med.csv").exists()
    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    monkeypatch.setattr(script, "train", lambda cfg: pytest.fail("a finished run was trained again"))
    assert script.main(flags(tmp_path, "--resume_from_checkpoint", "auto")) == 0
    assert "finished training earlier, so it is evaluated only" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "results" / "med.csv")))
    assert [row["run_name"] for row in rows] == [run_dir.name]
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.integration
def test_a_diverging_run_exits_1_with_what_to_change(tmp_path, capsys):
    argv = flags(tmp_path, "--mode", "fft", "--max_grad_norm", "0", "--do_eval", "False", "--max_steps", "6")
    argv = [a for a in argv if a not in ("--molf_lora_ranks", "[8]")]
    argv[argv.index("--learning_rate") + 1] = "1e30"
    assert load_script("train").main(argv) == 1
    err = capsys.readouterr().err
    assert "error: training diverged by step" in err and "Lower --learning_rate" in err
    assert not list((tmp_path / "runs").glob("*/final"))


def test_a_missing_tokenizer_directory_is_refused_before_loading(tmp_path, capsys):
    missing = tmp_path / "no_tokenizer"
    assert load_script("train").main(flags(tmp_path, "--tokenizer_name_or_path", str(missing))) == 2
    assert f"--tokenizer_name_or_path {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resuming_from_the_last_steps_checkpoint_trains_no_extra_step(tmp_path, capsys):
    # A run killed while writing final/ leaves the checkpoint of its last step; resuming it must give
    # the final model of the uninterrupted run (the Trainer alone would take one more step).
    from safetensors.torch import load_file

    argv = flags(tmp_path, "--max_steps", "4", "--clean_ckpt_at_end", "False", "--do_eval", "False",
                 "--lr_scheduler_type", "constant", "--warm_up_ratio", "0")
    script = load_script("train")
    assert script.main(argv) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    uninterrupted = load_file(run_dir / "final" / "model.safetensors")
    (run_dir / "final").rename(tmp_path / "final_before")
    assert script.main(argv + ["--resume_from_checkpoint", "auto"]) == 0
    assert "checkpoint-4 was saved at the last training step" in capsys.readouterr().out
    assert not (run_dir / "checkpoint-5").exists()
    resumed = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    steps = [json.loads(line)["step"] for line in open(run_dir / "molf_routing.jsonl") if '"step"' in line]
    assert max(steps) == 4


def test_preflight_of_a_finished_run_counts_and_evaluates_nothing(tmp_path, capsys):
    script = load_script("train")
    argv = flags(tmp_path, "--max_steps", "2")
    assert script.main(argv) == 0
    rows = (tmp_path / "results" / "med.csv").read_text()
    assert script.main(argv + ["--preflight", "True", "--resume_from_checkpoint", "auto"]) == 0
    assert "lora_experts" in capsys.readouterr().out
    assert (tmp_path / "results" / "med.csv").read_text() == rows  # no second row


def test_a_missing_resume_checkpoint_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    script = load_script("train")
    monkeypatch.setattr(script, "train", lambda cfg: pytest.fail("trained before the check"))
    missing = tmp_path / "checkpoint-7"
    assert script.main(flags(tmp_path, "--resume_from_checkpoint", str(missing))) == 2
    assert f"--resume_from_checkpoint {missing} is not a directory" in capsys.readouterr().err
    missing.mkdir()  # a directory the Trainer never finished writing; found by --validate_only too
    assert script.main(flags(tmp_path, "--resume_from_checkpoint", str(missing), "--validate_only", "True")) == 2
    assert "not a complete Trainer checkpoint" in capsys.readouterr().err


def test_count_params_relative_model_path_under_a_local_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpts").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_script("count_params").main(["--model_name_or_path", "ckpts/no_run"]) == 2
    assert "--model_name_or_path ckpts/no_run does not exist" in capsys.readouterr().err


def test_a_data_directory_without_the_split_file_is_refused_before_loading(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = flags(tmp_path, "--validate_only", "True")
    for flag in ("--data_path", "--eval_data_path"):
        argv[argv.index(flag) + 1] = str(empty)
    assert load_script("train").main(argv) == 2
    assert f"no train file in directory {empty}" in capsys.readouterr().err


def test_a_results_csv_with_other_columns_is_refused_before_training(tmp_path, capsys, monkeypatch):
    script = load_script("train")
    monkeypatch.setattr(script, "train", lambda cfg: pytest.fail("train() ran despite an unusable results CSV"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "med.csv").write_text("run_name,accuracy\nold,1.0\n")
    assert script.main(flags(tmp_path)) == 2
    assert "med.csv has columns ['run_name', 'accuracy'], not this task's schema" in capsys.readouterr().err
    assert (tmp_path / "results" / "med.csv").read_text() == "run_name,accuracy\nold,1.0\n"
    assert script.main(flags(tmp_path, "--do_eval", "False", "--validate_only", "True")) == 0  # no row, no check


@pytest.mark.integration
def test_a_malformed_record_found_while_training_is_a_one_line_error(tmp_path, capsys):
    import shutil

    data = tmp_path / "med"
    shutil.copytree(FIXTURES / "med", data)
    rows = (data / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[5])
    bad["cop"] = 4
    rows[5] = json.dumps(bad)
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    argv = flags(tmp_path, "--do_eval", "False")
    argv[argv.index("--data_path") + 1] = str(data)
    assert load_script("train").main(argv) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "train.jsonl:6: field 'cop'" in err and "Traceback" not in err


def test_progress_messages_of_the_package_are_printed(capsys):
    import logging

    script = load_script("train")
    script._show_progress_messages()
    script._show_progress_messages()  # idempotent: one handler
    logging.getLogger("molf.model.strategies.runtime").info("step 40: ffn fade starts")
    assert capsys.readouterr().err.count("step 40: ffn fade starts") == 1


def test_count_params_missing_model_path_is_one_error_line(tmp_path, capsys):
    assert load_script("count_params").main(["--model_name_or_path", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model_name_or_path") and "does not exist" in err and "Traceback" not in err


def test_count_params_script(capsys):
    assert load_script("count_params").main(["--model_name_or_path", TINY, "--mode", "molf_e",
                                             "--molf_lora_ranks", "[4,8]"]) == 0
    out = capsys.readouterr().out
    lora_line = next(line for line in out.splitlines() if line.startswith("lora_experts"))
    # 7 wrapped linears per layer, 2 layers; experts of ranks 4 and 8 hold (in + out) * 12 each.
    per_layer = (32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3  # q, o; k, v (2 kv heads); gate, up, down
    assert int(lora_line.split()[1].replace(",", "")) == 12 * 2 * per_layer


def test_count_params_target_modules_the_model_lacks_is_one_error_line(capsys):
    argv = ["--model_name_or_path", TINY, "--mode", "molf", "--molf_target_modules", "nonexistent"]
    assert load_script("count_params").main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no linear matches molf_target_modules") and "Traceback" not in err


def test_only_eval_without_a_final_model_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    script = load_script("train")
    monkeypatch.setattr(script, "only_eval", lambda cfg: pytest.fail("evaluated"))
    assert script.main(flags(tmp_path, "--only_eval", "True")) == 2
    assert "--only_eval needs a trained model at" in capsys.readouterr().err
