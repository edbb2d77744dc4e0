"""Run assembly: precision resolution, TrainingArguments, resume resolution, strategy guards, param counts."""

from __future__ import annotations

import pytest
import torch
from conftest import small_model
from trainrun_helpers import make_cfg

from molf.train import build
from molf.train.callbacks import JsonMetricsCallback, RoutingLogCallback, RunLogsCutter
from molf.train.param_count import count_parameters


def test_precision_resolution_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution")
    assert build.resolve_precision("auto") == "fp32"
    assert build.model_dtype("bf16_pure") == torch.bfloat16
    assert build.model_dtype("bf16_mixed") == torch.float32


def test_training_arguments_follow_the_config(tmp_path):
    cfg = make_cfg(tmp_path, seed=7, precision="bf16_mixed", report_to="json", warm_up_ratio=0.1,
                   lr_scheduler_type="cosine")
    args = build.training_arguments(cfg)
    assert (args.seed, args.data_seed, args.bf16) == (7, 7, True)
    assert args.report_to == [] and args.output_dir == str(cfg.run_dir)
    assert args.get_warmup_steps(100) == 10 and args.lr_scheduler_type.value == "cosine"
    kinds = [type(c) for c in build.run_callbacks(cfg)]
    assert kinds[0] is RunLogsCutter and set(kinds[1:]) == {RoutingLogCallback, JsonMetricsCallback}
    # Without the logs, a resumed run still cuts the ones an earlier attempt wrote.
    assert [type(c) for c in build.run_callbacks(make_cfg(tmp_path, "fft", report_to="none"))] == [RunLogsCutter]


def test_resume_resolution(tmp_path):
    cfg = make_cfg(tmp_path, resume_from_checkpoint="auto")
    assert build.resolve_resume(cfg) is None  # nothing to resume yet: a fresh start
    for step in (2, 10, 12):
        (cfg.run_dir / f"checkpoint-{step}").mkdir(parents=True)
    for step in (2, 10):  # checkpoint-12 lacks trainer_state.json: a run killed while saving it
        (cfg.run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert build.resolve_resume(cfg).endswith("checkpoint-10")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build.resolve_resume(make_cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "missing")))
    partial = str(cfg.run_dir / "checkpoint-12")
    with pytest.raises(FileNotFoundError, match="not a complete Trainer checkpoint"):
        build.resolve_resume(make_cfg(tmp_path, resume_from_checkpoint=partial))
    whole = str(cfg.run_dir / "checkpoint-2")
    assert build.resolve_resume(make_cfg(tmp_path, resume_from_checkpoint=whole)) == whole


def test_phased_strategy_refuses_ddp(tmp_path, monkeypatch):
    phases = [{"step": 0, "trainable": ["router", "lora"]}, {"step": 2, "trainable": ["lora", "base_ffn"]}]
    cfg = make_cfg(tmp_path, "moe_expert_lora", num_experts=2, expert_top_k=1, phases=phases)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="DDP"):
        build.attach_strategy(small_model(), cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build.attach_strategy(small_model(), cfg) is not None


def test_adapter_init_depends_on_the_seed_only(tmp_path):
    cfg = make_cfg(tmp_path)
    a = build.apply_mode(small_model(), cfg)
    torch.rand(100)  # consuming the global RNG must not change the adapters
    b = build.apply_mode(small_model(), cfg)
    c = build.apply_mode(small_model(), make_cfg(tmp_path, seed=1))
    key = "model.layers.0.self_attn.q_proj.lora_A.0"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_param_buckets(tmp_path):
    base = count_parameters(small_model())
    assert base["lora_experts"]["total"] == 0
    assert base["all"]["total"] == sum(p.numel() for p in small_model().parameters())
    molf = count_parameters(build.apply_mode(small_model(), make_cfg(tmp_path)))
    assert molf["base_weight"] == base["base_weight"] and molf["other"] == base["other"]
    assert molf["all"]["total"] - base["all"]["total"] == molf["lora_experts"]["total"] > 0
    lora = count_parameters(build.apply_mode(small_model(), make_cfg(tmp_path, "lora")))
    assert lora["all"]["trainable"] == lora["lora_experts"]["total"] == lora["lora_experts"]["trainable"]
    assert lora["base_weight"]["total"] == base["base_weight"]["total"]


@pytest.mark.parametrize("rank, rslora, alpha", [(32, True, 11.0), (16, True, 8.0), (16, False, 32.0)])
def test_peft_lora_config_uses_the_reference_alpha(tmp_path, rank, rslora, alpha):
    from molf.model.lora_peft import lora_config

    cfg = make_cfg(tmp_path, "lora", lora_rank=rank, use_rslora=rslora, lora_dropout=0.05)
    peft_cfg = lora_config(cfg)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.use_rslora, peft_cfg.lora_dropout) == (rank, alpha, rslora, 0.05)


def test_peft_lora_mode_drops_its_inputs_with_lora_dropout(tmp_path):
    from molf.model.dropout import LoRADropout

    model = build.apply_mode(small_model(), make_cfg(tmp_path, "lora", lora_dropout=0.05))
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is LoRADropout and d.p == 0.05 for d in dropouts)


def test_an_earlier_run_in_the_run_directory_is_never_overwritten_silently(tmp_path):
    cfg = make_cfg(tmp_path)
    assert build.outputs_to_clear(cfg) == []  # nothing there yet
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (cfg.run_dir / "final").mkdir()
    with pytest.raises(ValueError, match="already holds this run \\(final, metrics.jsonl\\).*--overwrite_run_dir"):
        build.outputs_to_clear(cfg)
    auto = make_cfg(tmp_path, resume_from_checkpoint="auto")  # finished: nothing cleared, only evaluated
    assert build.outputs_to_clear(auto) == [] and build.finished_earlier(auto)
    assert not build.finished_earlier(cfg)
    overwrite = make_cfg(tmp_path, overwrite_run_dir=True)
    assert build.outputs_to_clear(overwrite) == ["final", "metrics.jsonl"]
    (cfg.run_dir / "resolved_config.yaml").write_text("mode: molf\n")
    build.clear_run_outputs(cfg.run_dir, build.outputs_to_clear(overwrite))
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["resolved_config.yaml"]


def test_auto_resume_continues_a_checkpoint_or_restarts_an_unfinished_run(tmp_path):
    auto = make_cfg(tmp_path, resume_from_checkpoint="auto")
    (auto.run_dir / "checkpoint-4").mkdir(parents=True)  # torn: no trainer_state.json
    (auto.run_dir / "molf_routing.jsonl").write_text("{}\n")
    (auto.run_dir / "final.partial").mkdir()  # killed while saving the final model
    (auto.run_dir / "adapter").mkdir()  # ... after its PEFT adapter was written
    assert build.outputs_to_clear(auto) == ["checkpoint-4", "final.partial", "adapter", "molf_routing.jsonl"]
    assert not build.finished_earlier(auto)
    (auto.run_dir / "checkpoint-2").mkdir()
    (auto.run_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert build.outputs_to_clear(auto) == []  # resumes from checkpoint-2
    with pytest.raises(ValueError, match="drop --resume_from_checkpoint"):
        make_cfg(tmp_path, resume_from_checkpoint="auto", overwrite_run_dir=True)


@pytest.mark.parametrize("mode", ["dense_lora", "mixture_lora", "moe_expert_lora"])
def test_strategy_adapters_and_routers_have_their_buckets(tmp_path, mode):
    model = small_model()
    runtime = build.attach_strategy(model, make_cfg(tmp_path, mode, num_experts=2, expert_top_k=1, lora_rank=4))
    counts = count_parameters(model)
    assert counts["lora_experts"]["total"] == sum(p.numel() for p in runtime.groups["lora"]) > 0
    assert counts["router"]["total"] == sum(p.numel() for p in runtime.groups["router"])
    assert (counts["router"]["total"] > 0) == (mode != "dense_lora")
    assert counts["other"]["total"] == count_parameters(small_model())["other"]["total"]
