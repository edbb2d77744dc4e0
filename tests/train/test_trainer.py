"""The real HF Trainer on a tiny model (CPU, fp32): every mode learns, GA invariance, resume, merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import small_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trainrun_helpers import losses, make_cfg, token_dataset, train, weights

from molf.analysis.routing_log import read_routing_log
from molf.model.tiny import QWEN25_VOCAB_SIZE
from molf.optim.molf_adamw import MoLFAdamW
from molf.train.build import resolve_resume
from molf.train.export import save_final

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["fft", "lora", "molf", "molf_e"])
def test_each_mode_overfits(mode, tmp_path, tokenizer):
    data = token_dataset(num_rows=8)
    # A rank-4 adapter alone fits random tokens slowly: it gets more steps and a looser bar.
    steps, bar = (32, 0.95) if mode == "lora" else (16, 0.8)
    cfg = make_cfg(tmp_path, mode, max_steps=steps, logging_steps=4, learning_rate=1e-2, lora_learning_rate=1e-2)
    trainer = train(cfg, small_model(), tokenizer, data)
    history = losses(trainer)
    assert history[-1] < bar * history[0], history
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert logged["tokens_per_second"] > 0 and logged["step_time_s"] > 0 and logged["peak_memory_gb"] > 0
    optimizer = trainer.torch_optimizer
    if mode in ("molf", "molf_e"):
        assert isinstance(optimizer, MoLFAdamW)
    else:
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_throughput_counts_input_and_label_tokens(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "fft", max_steps=2, logging_steps=2)
    trainer = train(cfg, small_model(), tokenizer, token_dataset(length=12, prompt=4))
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    # 12 tokens per row, 8 of them labels: the two rates keep that ratio.
    assert logged["label_tokens_per_second"] / logged["tokens_per_second"] == pytest.approx(8 / 12)


def test_gradient_accumulation_2x2_equals_batch_4(tmp_path, tokenizer):
    data = token_dataset(num_rows=16)
    a = train(make_cfg(tmp_path / "a", max_steps=3, per_device_batch_size=4), small_model(), tokenizer, data)
    b = train(make_cfg(tmp_path / "b", max_steps=3, per_device_batch_size=2, gradient_accumulation_steps=2),
              small_model(), tokenizer, data)
    wa, wb = weights(a.model), weights(b.model)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-5, msg=key)
    assert a.torch_optimizer.last_routing.winners.equal(b.torch_optimizer.last_routing.winners)


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    data = token_dataset(num_rows=32)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=None, lora_dropout=0.1,
                  lr_scheduler_type="cosine", warm_up_ratio=0.2, report_to="json", logging_steps=1)
    full_cfg = make_cfg(tmp_path / "full", **common)
    full = train(full_cfg, small_model(), tokenizer, data)
    # A run killed after step 3's checkpoint, with routing lines past it (steps 4..6), resumes with "auto".
    cut_cfg = make_cfg(tmp_path / "cut", resume_from_checkpoint="auto", **common)
    cut_cfg.run_dir.mkdir(parents=True)
    shutil.copytree(full_cfg.run_dir / "checkpoint-3", cut_cfg.run_dir / "checkpoint-3")
    for name in ("molf_routing.jsonl", "metrics.jsonl"):
        shutil.copy(full_cfg.run_dir / name, cut_cfg.run_dir / name)
    assert resolve_resume(cut_cfg).endswith("checkpoint-3")
    resumed = train(cut_cfg, small_model(), tokenizer, data, resume=resolve_resume(cut_cfg))
    assert resumed.state.global_step == 6
    for key, value in weights(full.model).items():
        torch.testing.assert_close(weights(resumed.model)[key], value, atol=0, rtol=0, msg=key)
    full_log, cut_log = (read_routing_log(c.run_dir / "molf_routing.jsonl") for c in (full_cfg, cut_cfg))
    assert cut_log.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert (cut_log.winners == full_log.winners).all()
    lines = (cut_cfg.run_dir / "molf_routing.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines].count("header") == 1
    metrics = [json.loads(line) for line in (cut_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]


def test_routing_log_every_n_steps(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, max_steps=6, routing_log_every=2)
    train(cfg, small_model(), tokenizer)
    log = read_routing_log(cfg.run_dir / "molf_routing.jsonl")
    assert log.steps.tolist() == [2, 4, 6]
    assert log.experts == ["fft", "lora0_r4"] and log.meta["every"] == 2
    # A run shorter than the interval logs no step, but its log has the header.
    short = make_cfg(tmp_path / "short", max_steps=2, routing_log_every=5)
    train(short, small_model(), tokenizer)
    lines = [json.loads(line) for line in (short.run_dir / "molf_routing.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == ["header"] and lines[0]["every"] == 5


def test_a_resume_with_other_log_settings_leaves_no_stale_line(tmp_path, tokenizer):
    data = token_dataset(num_rows=32)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=None, logging_steps=1)
    full_cfg = make_cfg(tmp_path / "full", report_to="json", **common)
    train(full_cfg, small_model(), tokenizer, data)
    # The killed run logged every step and wrote metrics; the resumed one logs every 2nd step, no metrics.
    cut_cfg = make_cfg(tmp_path / "cut", routing_log_every=2, **common)
    cut_cfg.run_dir.mkdir(parents=True)
    shutil.copytree(full_cfg.run_dir / "checkpoint-3", cut_cfg.run_dir / "checkpoint-3")
    for name in ("molf_routing.jsonl", "metrics.jsonl"):
        shutil.copy(full_cfg.run_dir / name, cut_cfg.run_dir / name)
    train(cut_cfg, small_model(), tokenizer, data, resume=str(cut_cfg.run_dir / "checkpoint-3"))
    log = read_routing_log(cut_cfg.run_dir / "molf_routing.jsonl")
    assert log.steps.tolist() == [1, 2, 3, 4, 6]
    assert log.meta["every"] == 1 and log.meta["every_changes"] == [[3, 2]]
    metrics = [json.loads(line) for line in (cut_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]


class FreezeAt(TrainerCallback):
    """Freezes everything but the MLPs at a step and has the trainer rebuild its optimizer."""

    def __init__(self, step: int):
        self.step, self.trainer, self.lrs = step, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for name, p in self.trainer.model.named_parameters():
                p.requires_grad_(".mlp." in name)
            self.trainer.rebuild_optimizer()
        self.lrs.append([g["lr"] for g in self.trainer.torch_optimizer.param_groups])


def test_rebuild_optimizer_keeps_scheduler_position(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "fft", max_steps=6, lr_scheduler_type="linear", learning_rate=1e-3)
    callback = FreezeAt(3)
    trainer = train(cfg, small_model(), tokenizer, callbacks=[callback], start=False)
    callback.trainer = trainer
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    at_freeze = {}
    trainer.add_callback(SnapshotAt(3, trainer, at_freeze))
    trainer.train()
    # Linear decay from 1e-3 over 6 steps: the rebuilt optimizer continues at step 3's factor.
    assert callback.lrs[3] == [pytest.approx(1e-3 * 3 / 6)] * len(callback.lrs[3])
    assert trainer.lr_scheduler.optimizer is trainer.torch_optimizer
    # The old optimizer (and its moments) is let go: accelerate and the callbacks hold the new one only.
    assert trainer.accelerator._optimizers == [trainer.optimizer]
    assert trainer.callback_handler.optimizer is trainer.optimizer
    in_optimizer = {id(p) for g in trainer.torch_optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        assert (id(p) in in_optimizer) == (".mlp." in name), name
        moved_after_freeze = not torch.equal(p.detach(), at_freeze[name])
        assert moved_after_freeze == (".mlp." in name), name
        assert not torch.equal(p.detach(), before[name]), name  # everything trained before the freeze


class SnapshotAt(TrainerCallback):
    def __init__(self, step, trainer, into):
        self.step, self.trainer, self.into = step, trainer, into

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.into.update({n: p.detach().clone() for n, p in self.trainer.model.named_parameters()})


@pytest.mark.parametrize("mode", ["molf", "molf_e", "lora", "fft"])
def test_final_checkpoint_is_vanilla_with_the_same_logits(mode, tmp_path, tokenizer):
    extra = {"molf_freeze_non_linear": True} if mode == "molf_e" else {}
    cfg = make_cfg(tmp_path, mode, max_steps=4, learning_rate=1e-2, lora_learning_rate=1e-2, **extra)
    # The full vocabulary: the Trainer writes the tokenizer's special ids into the config, and a
    # saved model only reloads when they are valid ids.
    trainer = train(cfg, small_model(vocab_size=QWEN25_VOCAB_SIZE), tokenizer)
    model = trainer.model.eval()
    inputs = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    final, _ = save_final(model, tokenizer, cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    assert {n for n, _ in reloaded.named_parameters()} == {n for n, _ in small_model().named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert (final / "tokenizer.json").is_file()
    if mode in ("lora", "molf_e"):
        from peft import PeftModel

        base = small_model(vocab_size=QWEN25_VOCAB_SIZE)
        adapted = PeftModel.from_pretrained(base, cfg.run_dir / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_failed_merge_is_an_error_and_saves_nothing(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "molf", max_steps=1)
    trainer = train(cfg, small_model(), tokenizer)
    with torch.no_grad():
        next(m for m in trainer.model.modules() if hasattr(m, "lora_B")).lora_B[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_final(trainer.model, tokenizer, cfg)
    assert not (cfg.run_dir / "final").exists()


class PoisonAt(TrainerCallback):
    """Writes NaN into the embedding at the start of step ``step`` (0-based), as a diverging run would."""

    def __init__(self, model, step: int):
        self.model, self.step = model, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.model.get_input_embeddings().weight[:] = float("nan")


@pytest.mark.parametrize("mode", ["fft", "molf"])
def test_a_diverged_run_stops_with_an_error_before_saving_a_bad_checkpoint(mode, tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, mode, max_steps=5, logging_steps=1, save_strategy="steps", save_steps=1,
                   save_total_limit=None)
    model = small_model()
    trainer = train(cfg, model, tokenizer, start=False)
    trainer.add_callback(PoisonAt(model, step=2))
    with pytest.raises(FloatingPointError, match="training diverged by step 3: 1 micro-batch loss.*--learning_rate"):
        trainer.train()
    assert sorted(p.name for p in cfg.run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(cfg.run_dir / "checkpoint-2" / "model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    logged = losses(trainer)
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))


class PoisonNormAfterStep(TrainerCallback):
    """Writes ``value`` into the final norm after optimizer step 1: the update went bad, its loss was finite."""

    def __init__(self, model, value: float):
        self.model, self.value = model, value

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                self.model.model.norm.weight[0] = self.value


# steps: caught before the step's save. epoch / no: no log or step-save falls on the bad step, so the
# epoch's checkpoint (or, with no saving, the end of training, before the caller saves the final model)
# is where it must be caught.
@pytest.mark.parametrize("save_strategy, value", [("steps", float("inf")), ("epoch", float("nan")),
                                                  ("no", float("nan"))])
def test_nan_weights_are_caught_before_a_save_and_at_the_end(save_strategy, value, tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "fft", max_steps=2, logging_steps=10, save_strategy=save_strategy, save_steps=2)
    model = small_model()
    trainer = train(cfg, model, tokenizer, start=False)
    trainer.add_callback(PoisonNormAfterStep(model, value))
    with pytest.raises(FloatingPointError, match="1 trainable tensor\\(s\\) hold NaN/inf"):
        trainer.train()
    assert not list(cfg.run_dir.glob("checkpoint-*"))


def test_checkpoint_saving_is_not_counted_in_the_step_time(tmp_path, tokenizer, monkeypatch):
    from types import SimpleNamespace

    # The meter's clock is fake: a millisecond per reading, and 100 s for every checkpoint written, so
    # the test does not depend on how fast (or how loaded) the machine is.
    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr("molf.train.throughput.time", SimpleNamespace(perf_counter=perf_counter))
    cfg = make_cfg(tmp_path, "fft", max_steps=6, logging_steps=2, save_strategy="steps", save_steps=1,
                   save_total_limit=None)
    trainer = train(cfg, small_model(), tokenizer, start=False)
    real_save = trainer._save_checkpoint

    def slow_save(*args, **kwargs):  # every step saves: odd ones without a log line, even ones after it
        real_save(*args, **kwargs)
        clock[0] += 100.0

    monkeypatch.setattr(trainer, "_save_checkpoint", slow_save)
    trainer.train()
    times = [entry["step_time_s"] for entry in trainer.state.log_history if "step_time_s" in entry]
    assert len(times) == 3 and max(times) < 1.0, times


def test_a_zero_gradient_norm_is_warned_once(tmp_path, tokenizer, caplog):
    from transformers import TrainerState

    from molf.train.trainer import DivergenceGuard

    cfg = make_cfg(tmp_path, "fft", max_steps=2, logging_steps=1)
    trainer = train(cfg, small_model(), tokenizer)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["grad_norm"] > 0 for entry in logged)  # the key the guard reads
    assert "gradient norm is exactly 0" not in caplog.text

    guard, state = DivergenceGuard(trainer), TrainerState(global_step=7)
    guard.on_log(cfg, state, None, logs={"loss": 11.93, "grad_norm": 0.0})
    guard.on_log(cfg, state, None, logs={"loss": 11.93, "grad_norm": 0.0})
    assert caplog.text.count("step 7: the gradient norm is exactly 0") == 1
