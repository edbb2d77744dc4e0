"""Train a tiny Qwen2 a few steps on each task's fixture, evaluate it, find its row in the task's CSV."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from molf.data import SFTCollator, build_train_dataset
from molf.data.config import DataConfig
from molf.eval import evaluate_task
from molf.eval import cli as eval_cli
from molf.eval.cli import StandaloneEvalConfig, cli, main
from molf.eval.results import EVALUATOR_COLUMNS, RUN_COLUMNS, TASK_METRICS
from molf.model.tiny import build_tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
TASKS = {
    "med": ("med/train.jsonl", "med/validation.jsonl"),
    "sql": ("sql/sql_create_context.jsonl", "sql/spider_dev.jsonl"),
    "fact": ("fact/counterfact.jsonl", None),
}


def _train_few_steps(model, dataset, tokenizer, steps=2):
    loader = DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=SFTCollator(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _, batch in zip(range(steps), loader):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _run_info(task):
    info = {name: None for name in RUN_COLUMNS if name not in EVALUATOR_COLUMNS}
    info.update(run_name=f"e2e_{task}", mode="fft", model="tiny-qwen2", dataset=task, learning_rate=1e-2, seed=0)
    return info


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_evaluate_and_append_row(task, tokenizer, tmp_path):
    train_path, eval_path = TASKS[task]
    cfg = StandaloneEvalConfig(dataset_type=task, data_path=str(FIXTURES / train_path),
                               eval_data_path=str(FIXTURES / eval_path) if eval_path else None, num_train_samples=8,
                               max_seq_length=256, num_eval_samples=4, eval_batch_size=4, max_new_tokens=4,
                               results_dir=str(tmp_path))
    model = build_tiny_model("qwen2", seed=0, **TINY)
    losses = _train_few_steps(model, build_train_dataset(cfg, tokenizer, seed=0), tokenizer)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    metrics = evaluate_task(task, model, tokenizer, cfg, _run_info(task))
    with (tmp_path / f"{task}.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert list(row) == list(RUN_COLUMNS) + list(TASK_METRICS[task])
    assert row["run_name"] == f"e2e_{task}" and row["num_eval"] == "4" and row["num_eval_samples"] == "4"
    for name in TASK_METRICS[task]:
        assert float(row[name]) == pytest.approx(metrics[name], nan_ok=True)
    if task != "fact":
        assert 0.0 <= metrics[TASK_METRICS[task][0]] <= 100.0


def test_cli_fills_run_columns_from_resolved_config_or_falls_back(tokenizer, tmp_path):
    checkpoint = tmp_path / "run" / "final"
    build_tiny_model("qwen2", seed=0, **TINY).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    args = ["--task", "med", "--model", str(checkpoint), "--data_path", str(FIXTURES / "med" / "validation.jsonl"),
            "--num_eval_samples", "2", "--results_dir", str(tmp_path / "results")]
    metrics = main(args)
    with (tmp_path / "results" / "med.csv").open(newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["run_name"] == "run" and row["mode"] == "unknown" and row["checkpoint"] == str(checkpoint)
    assert float(row["accuracy"]) == pytest.approx(metrics["accuracy"])


def test_med_subjects_go_to_a_details_json(tokenizer, tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "med" / "validation.jsonl").read_text().splitlines()[:3]]
    for record, subject in zip(records, ["Anatomy", "Anatomy", "Surgery"]):
        record["subject_name"] = subject
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    cfg = StandaloneEvalConfig(dataset_type="med", eval_data_path=str(data), max_new_tokens=2,
                               results_dir=str(tmp_path))
    evaluate_task("med", build_tiny_model("qwen2", seed=0, **TINY), tokenizer, cfg, _run_info("med"))
    details = json.loads((tmp_path / "med_details" / "e2e_med.json").read_text())
    assert sorted(details["per_subject"]) == ["Anatomy", "Surgery"]
    assert details["per_subject"]["Anatomy"]["num_eval"] == 2


def test_data_config_rejects_bad_answer_base():
    with pytest.raises(ValueError, match="med_answer_index_base"):
        DataConfig(med_answer_index_base=2)


def test_cli_reads_resolved_config_of_the_run(tokenizer, tmp_path):
    from molf.config import TrainingConfig

    run_cfg = TrainingConfig(dataset_type="med", mode="fft", model_name_or_path="tiny-qwen2",
                             ckpt_dir_root=str(tmp_path))
    checkpoint = tmp_path / "run" / "final"
    build_tiny_model("qwen2", seed=0, **TINY).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    with (tmp_path / "run" / "resolved_config.yaml").open("w") as handle:
        run_cfg.dump_yaml(handle)
    main(["--task", "med", "--model", str(checkpoint), "--data_path", str(FIXTURES / "med" / "validation.jsonl"),
          "--num_eval_samples", "2", "--max_seq_length", "200", "--results_dir", str(tmp_path / "results")])
    with (tmp_path / "results" / "med.csv").open(newline="") as handle:
        [row] = list(csv.DictReader(handle))
    # The evaluation's flags (here a max_seq_length the run did not train with) leave the run's row alone.
    assert row["run_name"] == run_cfg.run_name and row["mode"] == "fft" and row["model"] == "tiny-qwen2"
    assert row["other_hparams"] == "{}" and row["num_eval_samples"] == "2"
    assert row["checkpoint"] == str(checkpoint)


def test_results_file_of_another_schema_fails_before_generation(tokenizer, tmp_path, monkeypatch):
    import molf.eval.runner as runner

    (tmp_path / "med.csv").write_text("run_name,accuracy\nold,50\n")
    monkeypatch.setattr(runner, "generate_greedy", lambda *args, **kwargs: pytest.fail("generated before the check"))
    cfg = StandaloneEvalConfig(dataset_type="med", eval_data_path=str(FIXTURES / "med" / "validation.jsonl"),
                               results_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not this task's schema"):
        evaluate_task("med", build_tiny_model("qwen2", seed=0, **TINY), tokenizer, cfg, _run_info("med"))
    assert (tmp_path / "med.csv").read_text() == "run_name,accuracy\nold,50\n"


def test_a_row_the_csv_refuses_is_kept_in_a_json_file(tokenizer, tmp_path, monkeypatch):
    import molf.eval.runner as runner

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "append_task_row", refuse)
    cfg = StandaloneEvalConfig(dataset_type="med", eval_data_path=str(FIXTURES / "med" / "validation.jsonl"),
                               num_eval_samples=2, max_new_tokens=2, results_dir=str(tmp_path))
    with pytest.raises(OSError, match="disk full.*saved to .*e2e_med.unappended_row.json"):
        evaluate_task("med", build_tiny_model("qwen2", seed=0, **TINY), tokenizer, cfg, _run_info("med"))
    kept = json.loads((tmp_path / "med_details" / "e2e_med.unappended_row.json").read_text())
    assert kept["run_name"] == "e2e_med" and kept["num_eval"] == 2 and "accuracy" in kept


def test_med_eval_prompt_is_the_training_prompt_under_max_seq_length(tokenizer):
    from molf.data import load_examples
    from molf.data.encoding import IGNORE_INDEX, encode_example, encode_prompt
    from molf.eval.runner import _prompt_budget

    cfg = DataConfig(dataset_type="med", eval_data_path=str(FIXTURES / "med" / "validation.jsonl"))
    example = max(load_examples(cfg, "eval"), key=lambda e: len(e.prompt))
    limit = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"]) - 5  # forces a cut
    trained = encode_example(tokenizer, example.prompt, example.target, limit)
    prompt_in_training = [t for t, label in zip(trained["input_ids"], trained["labels"]) if label == IGNORE_INDEX]
    budget = _prompt_budget(tokenizer, example, limit, beside_target=True)
    assert encode_prompt(tokenizer, example.prompt, budget) == prompt_in_training


def test_med_evaluation_generates_from_the_training_prompts(tokenizer, monkeypatch):
    from molf.data.encoding import IGNORE_INDEX, encode_example
    from molf.eval import runner

    limit = 40  # cuts the fixture's longer prompts
    cfg = StandaloneEvalConfig(dataset_type="med", eval_data_path=str(FIXTURES / "med" / "validation.jsonl"),
                               max_seq_length=limit)
    seen = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return ["A"] * len(prompts)

    monkeypatch.setattr(runner, "generate_greedy", fake_generate)
    runner.evaluate_medmcqa(None, tokenizer, cfg)
    examples = runner.load_examples(cfg, "eval")
    trained = [encode_example(tokenizer, e.prompt, e.target, limit) for e in examples]
    expected = [[t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX] for row in trained]
    assert seen == expected
    assert any(len(prompt) < len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"])
               for prompt, e in zip(seen, examples))  # the limit did cut some prompts


@pytest.mark.parametrize("case", ["checkpoint", "run_directory", "tokenizer", "train_data_only", "data_path",
                                  "results_csv"])
def test_cli_bad_path_is_one_error_line_before_loading(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    args = {"--task": "med", "--model": "tiny-qwen2", "--data_path": str(FIXTURES / "med" / "validation.jsonl"),
            "--results_dir": str(tmp_path)}
    expected = {"checkpoint": "checkpoint directory .*missing_run not found",
                "tokenizer": "--tokenizer .*no_tokenizer does not exist",
                "train_data_only": "--train_data_path .*train.jsonl is a local file and no --data_path says what to "
                                   "evaluate med on",
                "run_directory": "run holds no saved model .*; for a run directory pass .*run/final",
                "data_path": "data path .*no_such_file.jsonl does not exist",
                "results_csv": "not this task's schema"}[case]
    if case == "checkpoint":
        args["--model"] = str(tmp_path / "missing_run")
    elif case == "tokenizer":
        args["--tokenizer"] = str(tmp_path / "no_tokenizer")
    elif case == "train_data_only":
        del args["--data_path"]
        args["--train_data_path"] = str(FIXTURES / "med" / "train.jsonl")
    elif case == "run_directory":
        (tmp_path / "run" / "final").mkdir(parents=True)
        args["--model"] = str(tmp_path / "run")
    elif case == "data_path":
        args["--data_path"] = str(tmp_path / "no_such_file.jsonl")
    else:
        (tmp_path / "med.csv").write_text("run_name,accuracy\nold,50\n")
    assert cli([item for pair in args.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(expected, err)
    if case == "results_csv":
        assert (tmp_path / "med.csv").read_text() == "run_name,accuracy\nold,50\n"


def test_cli_malformed_record_exits_1_and_appends_no_row(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "validation.jsonl"
    bad.write_text((FIXTURES / "med" / "validation.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    argv = ["--task", "med", "--model", "tiny-qwen2", "--data_path", str(bad), "--results_dir", str(tmp_path / "r")]
    assert cli(argv) == 1
    assert re.search(r"error: .*validation.jsonl:2: not valid JSON", capsys.readouterr().err)
    assert not (tmp_path / "r" / "med.csv").exists()
    monkeypatch.setenv("MOLF_TRACEBACK", "1")  # the traceback instead of the line
    with pytest.raises(ValueError, match="not valid JSON"):
        cli(argv)


def test_a_ddp_run_evaluated_in_one_process_keeps_its_run_name(tmp_path, monkeypatch):
    from molf.config import TrainingConfig
    from molf.eval.checkpoint import load_training_config, run_info_for

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # evaluated by plain python
    run_cfg = TrainingConfig(dataset_type="med", mode="fft", model_name_or_path="tiny-qwen2",
                             ckpt_dir_root=str(tmp_path))
    for world_size in (2, 1):
        run_dir = tmp_path / run_cfg.run_name_for(world_size)
        (run_dir / "final").mkdir(parents=True)
        with (run_dir / "resolved_config.yaml").open("w") as handle:
            run_cfg.dump_yaml(handle)
        info = run_info_for(str(run_dir / "final"), "med", load_training_config(run_dir / "resolved_config.yaml"))
        assert info["run_name"] == run_dir.name
        assert json.loads(info["other_hparams"]).get("world_size") == (2 if world_size == 2 else None)
