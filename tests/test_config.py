"""TrainingConfig: flat flags, reference spellings, parse-time validation, run naming, YAML round trip."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest

from molf.config import TrainingConfig, parse_config
from molf.eval.results import RUN_COLUMNS

QUICKSTART = [
    "--model_name_or_path", "Qwen/Qwen2.5-1.5B", "--dataset_type", "med", "--mode", "molf",
    "--molf_score_fn", "true_projected", "--molf_topk", "1", "--molf_lora_ranks", "[128]",
    "--learning_rate", "5e-5", "--lora_learning_rate", "5e-5", "--weight_decay", "0.1",
    "--lora_weight_decay", "0.01", "--use_rslora", "True", "--per_device_batch_size", "8",
    "--gradient_accumulation_steps", "4", "--num_train_epochs", "2", "--lr_scheduler_type", "cosine",
    "--warm_up_ratio", "0.1", "--ckpt_dir_root", "ckpts/",
]


def test_quickstart_flags_parse_flat():
    cfg = parse_config(QUICKSTART)
    assert (cfg.mode, cfg.molf_lora_ranks, cfg.molf_topk, cfg.weight_decay) == ("molf", [128], 1, 0.1)
    assert (cfg.per_device_batch_size, cfg.gradient_accumulation_steps, cfg.lr_scheduler_type) == (8, 4, "cosine")


def test_every_reference_flag_is_a_field():
    reference = """model_name_or_path dataset_type mode learning_rate lora_learning_rate weight_decay
    lora_weight_decay num_train_epochs lr_scheduler_type warm_up_ratio per_device_batch_size
    gradient_accumulation_steps seed ckpt_dir_root log_dir_root logging_steps report_to save_strategy
    save_steps save_total_limit clean_ckpt_at_end only_eval lora_rank lora_alpha lora_dropout use_rslora
    lora_effective_scale molf_lora_ranks molf_score_fn molf_topk molf_fft molf_freeze_non_linear""".split()
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert [flag for flag in reference if flag not in names] == []


@pytest.mark.parametrize("args", [
    ["--mode", "molf_e", "--molf_lora_ranks", "[32,128]"],
    ["--mode", "molf", "--molf_fft", "False", "--molf_lora_ranks", "[32,128]"],
])
def test_molf_e_spellings_name_the_same_run(args):
    cfg = parse_config(args)
    assert (cfg.mode, cfg.molf_fft, cfg.molf_lora_ranks) == ("molf_e", False, [32, 128])
    assert cfg.run_name == parse_config(["--mode", "molf_e", "--molf_lora_ranks", "[32,128]"]).run_name


@pytest.mark.parametrize("args, fragment", [
    (["--molf_topk", "0"], "molf_topk must be >= 1"),
    (["--molf_topk", "3"], "exceeds the 2 experts"),
    (["--mode", "molf_e", "--molf_lora_ranks", "[32,128]", "--molf_topk", "3"], "exceeds the 2 experts"),
    (["--molf_lora_ranks", "[0]"], "molf_lora_ranks must be positive"),
    (["--molf_lora_ranks", "[-4,8]"], "molf_lora_ranks must be positive"),
    (["--lora_rank", "0"], "lora_rank must be a positive"),
    (["--mode", "fft", "--molf_topk", "2"], "used only by --mode molf"),
    (["--mode", "lora", "--molf_lora_ranks", "[8]"], "used only by --mode molf"),
    (["--mode", "molf_e", "--molf_fft", "True"], "--mode molf_e has no FFT expert"),
    (["--mode", "fft", "--molf_fft", "False"], "used only by --mode molf"),
    (["--lr_scheduler_type", "cosinus"], "lr_scheduler_type 'cosinus' is not supported"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "is not supported"),
    (["--warm_up_ratio", "1.5"], "warm_up_ratio"),
    (["--per_device_batch_size", "0"], "per_device_batch_size"),
    (["--validate_only", "True", "--preflight", "True"], "pick one"),
])
def test_invalid_combinations_fail_at_parse_time(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(args)


def test_unknown_score_fn_is_rejected_by_the_parser_and_by_the_dataclass(capsys):
    with pytest.raises(ValueError, match=r"argument --molf_score_fn: invalid choice: 'cosine' \(choose from"):
        parse_config(["--molf_score_fn", "cosine"])
    assert capsys.readouterr().err == ""  # no usage block: the caller prints the one line
    with pytest.raises(ValueError, match="unknown molf_score_fn"):
        TrainingConfig(molf_score_fn="cosine")


def test_flash_attention_without_flash_attn_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ValueError, match="pip install flash-attn"):
        parse_config(["--attn_implementation", "flash_attention_2"])


def test_parsing_creates_nothing_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["--ckpt_dir_root", str(tmp_path / "ck"), "--log_dir_root", str(tmp_path / "lg"),
                        "--report_to", "json"])
    assert cfg.run_dir.parent == tmp_path / "ck"
    assert list(tmp_path.iterdir()) == []


def test_ignored_knob_warns():
    with pytest.warns(UserWarning, match="--lora_rank is ignored in mode molf"):
        TrainingConfig(mode="molf", lora_rank=8)
    with pytest.warns(UserWarning, match="--num_experts is ignored in mode fft"):
        TrainingConfig(mode="fft", num_experts=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingConfig(mode="molf", learning_rate=1e-4, lora_learning_rate=1e-4)  # nothing ignored: no warning


VARIATIONS = {
    "mode": "fft", "model_name_or_path": "Qwen/Qwen2.5-3B", "dataset_type": "sql", "learning_rate": 1e-4,
    "lora_learning_rate": 5e-4, "weight_decay": 0.01, "lora_weight_decay": 0.1, "molf_lora_ranks": [32],
    "molf_topk": 2, "molf_score_fn": "projected", "lr_scheduler_type": "linear", "warm_up_ratio": 0.05,
    "num_train_epochs": 3.0, "per_device_batch_size": 4, "gradient_accumulation_steps": 8, "seed": 1,
    "data_path": "x.jsonl", "max_seq_length": 512, "lora_dropout": 0.1, "precision": "bf16_pure",
    "max_steps": 100, "num_train_samples": 1000,
}


def test_run_names_differ_for_every_distinguishing_hyperparameter():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = TrainingConfig()
        names = {"base": base.run_name}
        for field, value in VARIATIONS.items():
            names[field] = TrainingConfig(**{field: value}).run_name
    assert len(set(names.values())) == len(names), names
    assert TrainingConfig().run_name == base.run_name  # deterministic
    # Output locations and logging do not change the run's identity (resume finds the same directory).
    assert TrainingConfig(ckpt_dir_root="elsewhere", logging_steps=1, report_to="none").run_name == base.run_name


def test_a_ddp_run_does_not_share_the_directory_of_a_single_process_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TrainingConfig(per_device_batch_size=8, gradient_accumulation_steps=4)
    single = cfg.run_name
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: the same run as plain python
    assert cfg.run_name == single == cfg.run_name_for(1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # the global batch doubles: another run
    assert "bs8x4x2" in cfg.run_name.split("_") and cfg.run_name == cfg.run_name_for(2)
    assert cfg.run_name.rsplit("_", 1)[1] != single.rsplit("_", 1)[1]  # the hash differs too
    assert cfg.run_dir.name == cfg.run_name != cfg.run_name_for(1)
    assert cfg.to_run_info()["run_name"] == cfg.run_name
    assert json.loads(cfg.to_run_info()["other_hparams"])["world_size"] == 2  # tables keep the runs apart
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a process count"):
        cfg.run_name


def test_run_name_is_readable():
    cfg = parse_config(QUICKSTART + ["--seed", "7"])
    for part in ("molf", "Qwen2.5-1.5B", "med", "lr5e-05", "wd0.1", "lwd0.01", "r128", "k1", "epd", "cosine",
                 "wu0.1", "ep2", "bs8x4", "s7"):
        assert part in cfg.run_name.split("_"), part
    assert str(cfg.run_dir).startswith("ckpts")


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "abc"], "--seed: invalid literal"),
    (["--molf_lora_ranks", "[32,b]"], "--molf_lora_ranks.1: invalid literal"),
])
def test_a_value_of_the_wrong_type_names_its_flag(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(args)


@pytest.mark.parametrize("line, example", [
    ("molf_lora_ranks: 128", "[32,128]"),
    ("molf_target_modules: q_proj", "[q_proj,v_proj]"),
])
def test_a_yaml_list_without_brackets_gets_an_example_of_its_type(tmp_path, line, example):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    field = line.split(":")[0]
    with pytest.raises(ValueError, match=re.escape(f"write a list in brackets, e.g. --{field} \"{example}\"")):
        parse_config(["--config_path", str(path)])


@pytest.mark.parametrize("plain, bracketed", [
    (["--molf_lora_ranks", "32,128"], ["--molf_lora_ranks", "[32,128]"]),
    (["--molf_lora_ranks=64"], ["--molf_lora_ranks", "[64]"]),
    (["--molf_target_modules", "q_proj,v_proj"], ["--molf_target_modules", "[q_proj,v_proj]"]),
    (["--molf_exclude_modules="], ["--molf_exclude_modules", "[]"]),
    (["--mode", "moe_expert_lora", "--ffn_targets", "gate_proj"],
     ["--mode", "moe_expert_lora", "--ffn_targets", "[gate_proj]"]),
])
def test_list_flags_may_be_written_without_brackets(plain, bracketed):
    cfg = parse_config(plain)
    assert cfg == parse_config(bracketed)
    field = bracketed[-2].lstrip("-")
    assert isinstance(getattr(cfg, field), list) and getattr(cfg, field) != getattr(TrainingConfig(), field)


@pytest.mark.parametrize("value, fragment", [
    ("32,,128", "--molf_lora_ranks '32,,128' has an empty item; write e.g. --molf_lora_ranks 32,128"),
    ("32,128]", "--molf_lora_ranks: '128]' is not an integer"),
    ("0x10", "--molf_lora_ranks: '0x10' is not an integer"),
    ("[32,,128]", "a flag value is not valid YAML"),
])
def test_bad_list_values_are_one_line_errors(value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_config(["--molf_lora_ranks", value])


def test_bare_names_stay_strings_and_none_is_null():
    assert parse_config(["--molf_target_modules", "yes,no,*proj"]).molf_target_modules == ["yes", "no", "*proj"]
    assert parse_config(["--molf_target_modules", "None"]).molf_target_modules is None


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("mode: [molf\n")
    with pytest.raises(ValueError, match=f"--config_path {re.escape(str(path))} is not valid YAML: while parsing"):
        parse_config(["--config_path", str(path)])


@pytest.mark.parametrize("args, fragment", [
    (["--max_grad_norm", "nan"], "max_grad_norm must be a finite number >= 0"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be a finite number >= 0"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*32\)"),
    (["--seed", str(2**32)], r"seed must be in \[0, 2\*\*32\)"),
])
def test_out_of_range_clipping_norm_and_seed(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(args)


def test_an_unknown_yaml_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learnin_rate: 1e-3\n")
    with pytest.raises(ValueError, match="learnin_rate.*misspelled key"):
        parse_config(["--config_path", str(path)])


def test_max_steps_zero_and_negative_are_one_run():
    names = {parse_config(["--max_steps", value]).run_name for value in ("0", "-1", "-5")}
    assert len(names) == 1 and parse_config(["--max_steps", "0"]).max_steps == -1


@pytest.mark.parametrize("args", [
    ["--mode", "molf_e", "--molf_lora_ranks", "[32,128]", "--molf_topk", "2", "--seed", "3"],
    ["--mode", "molf", "--seed", "3"],
    ["--mode", "fft"],
    ["--mode", "lora"],
    ["--mode", "dense_lora"],
])
def test_yaml_round_trip(tmp_path, args):
    cfg = parse_config(args)
    path = tmp_path / "resolved_config.yaml"
    with open(path, "w") as handle:
        cfg.dump_yaml(handle)
    again = parse_config([], config_path=str(path))
    assert again == cfg and again.run_name == cfg.run_name


def test_save_strategy_no_survives_yaml_booleans(tmp_path):
    assert parse_config(["--save_strategy", "no"]).save_strategy == "no"
    path = tmp_path / "c.yaml"
    path.write_text("save_strategy: no\n")
    cfg = parse_config([], config_path=str(path))
    assert cfg.save_strategy == "no"
    dumped = tmp_path / "d.yaml"
    with open(dumped, "w") as handle:
        cfg.dump_yaml(handle)
    assert parse_config([], config_path=str(dumped)).save_strategy == "no"
    with pytest.raises(ValueError, match="save_strategy"):
        parse_config(["--save_strategy", "sometimes"])


def test_config_path_flag_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: lora\nlora_rank: 8\nseed: 5\n")
    cfg = parse_config(["--config_path", str(path), "--seed", "6"])
    assert (cfg.mode, cfg.lora_rank, cfg.seed) == ("lora", 8, 6)


def test_run_info_has_the_results_run_columns():
    info = parse_config(QUICKSTART).to_run_info()
    assert set(info) == set(RUN_COLUMNS) - {"timestamp_utc", "num_eval_samples", "num_eval"}
    assert info["molf_lora_ranks"] == "[128]" and info["lora_rank"] is None
    fft = TrainingConfig(mode="fft").to_run_info()
    assert fft["molf_topk"] is None and fft["lora_learning_rate"] is None
    assert fft["other_hparams"] == "{}" and fft["max_steps"] is None and fft["num_train_epochs"] == 2


def test_run_info_records_every_distinguishing_setting():
    """Two runs that differ only in a setting without its own column still differ in their row."""
    base = ["--mode", "molf", "--max_steps", "100"]
    info = parse_config(base + ["--lora_alpha", "16", "--precision", "fp32", "--data_path", "tests/fixtures/med",
                                "--eval_data_path", "tests/fixtures/med"]).to_run_info()
    assert (info["max_steps"], info["num_train_epochs"]) == (100, None)  # max_steps decides the length
    assert json.loads(info["other_hparams"]) == {"lora_alpha": 16.0, "precision": "fp32",
                                                 "data_path": "tests/fixtures/med"}
    assert json.loads(parse_config(base).to_run_info()["other_hparams"]) == {}


def test_strategy_mode_is_validated_at_parse_time():
    with pytest.raises(ValueError):
        parse_config(["--mode", "mixture_lora", "--num_experts", "2", "--expert_top_k", "3"])
    assert parse_config(["--mode", "dense_lora"]).mode == "dense_lora"


def test_eval_data_path_names_the_run_only_when_it_filters_training_rows():
    first, second = ({"data_path": "train.jsonl", "eval_data_path": path} for path in ("a.jsonl", "b.jsonl"))
    assert TrainingConfig(**first).run_dir == TrainingConfig(**second).run_dir
    assert (TrainingConfig(**first, drop_eval_overlap=True).run_dir
            != TrainingConfig(**second, drop_eval_overlap=True).run_dir)


@pytest.mark.parametrize("mode", ["fft", "lora", "molf"])
def test_handoff_outside_the_strategy_modes_is_an_error(mode):
    handoff = {"fade": [{"target": "ffn", "start_step": 4, "duration": 4}]}
    with pytest.raises(ValueError, match="handoff is for --mode moe_expert_lora only"):
        TrainingConfig(mode=mode, handoff=handoff)


def test_triton_score_backend_without_triton_fails_at_parse_time(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ValueError, match="molf_score_backend triton needs the 'triton' package"):
        TrainingConfig(mode="molf", molf_score_backend="triton")


def test_with_max_steps_a_handoff_past_the_last_step_fails_at_parse_time():
    phases = [{"step": 0, "trainable": ["router", "lora"]}, {"step": 2, "trainable": ["lora", "base_ffn"]}]
    handoff = {"fade": [{"target": "ffn", "start_step": 2, "duration": 4}]}
    fields = dict(mode="moe_expert_lora", num_experts=2, expert_top_k=1, phases=phases, handoff=handoff)
    with pytest.raises(ValueError, match="the ffn fade starts at step 2 but the last optimizer step is 2"):
        TrainingConfig(max_steps=3, **fields)
    TrainingConfig(max_steps=10, **fields)
    TrainingConfig(num_train_epochs=1, **fields)  # the step count is known only to the trainer


@pytest.mark.parametrize("extra, dropped", [
    ({"preflight": True}, "--preflight True"),
    ({"do_eval": False}, "--do_eval False"),
    ({"overwrite_run_dir": True}, "--overwrite_run_dir True"),
    ({"resume_from_checkpoint": "auto"}, "--resume_from_checkpoint"),
])
def test_only_eval_refuses_flags_it_would_ignore(extra, dropped):
    with pytest.raises(ValueError, match=f"--only_eval evaluates <run_dir>/final and nothing else; drop {dropped}"):
        TrainingConfig(only_eval=True, **extra)


def test_tiny_model_names_are_checked_at_parse_time():
    with pytest.raises(ValueError, match="unknown tiny model family 'nofamily'"):
        TrainingConfig(model_name_or_path="tiny-nofamily")
    with pytest.raises(ValueError, match="hidden_size takes a number, got 'abc'"):
        TrainingConfig(model_name_or_path="tiny-qwen2:hidden_size=abc")
    with pytest.warns(UserWarning, match="'hidden_sise' is not a field of Qwen2Config"):
        TrainingConfig(model_name_or_path="tiny-qwen2:hidden_sise=128")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingConfig(model_name_or_path="tiny-qwen2:hidden_size=32,head_dim=8")
