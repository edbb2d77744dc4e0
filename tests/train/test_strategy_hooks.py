"""The trainer drives a StrategyRuntime per the DEVELOPING.md contract (checked with a scripted fake)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_model
from transformers import TrainerCallback
from trainrun_helpers import make_cfg, token_dataset

from molf.data import SFTCollator
from molf.train.build import build_trainer

pytestmark = pytest.mark.integration


class ScriptedRuntime:
    """MLPs train from the start ("lora" kind); attention joins at step 3 ("base_ffn" kind, half lr)."""

    phases, handoff = [0], None

    def __init__(self, model, extra: float):
        params = dict(model.named_parameters())
        self.groups = {"lora": [p for n, p in params.items() if ".mlp." in n],
                       "base_ffn": [p for n, p in params.items() if ".self_attn." in n]}
        self.extra, self.active = extra, {"lora"}
        self.masks, self.calls = [], 0
        self._set(model)

    def _set(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        for kind in self.active:
            for p in self.groups[kind]:
                p.requires_grad_(True)

    def on_step_begin(self, model, step):
        if step == 3 and "base_ffn" not in self.active:
            self.active = {"lora", "base_ffn"}
            self._set(model)
            return True
        return False

    def param_groups(self):
        return {kind: self.groups[kind] for kind in ("lora", "base_ffn") if kind in self.active}

    def set_token_mask(self, attention_mask):
        self.masks.append(attention_mask)

    def extra_loss(self, model):
        self.calls += 1
        return torch.tensor(self.extra), {"scripted_extra": self.extra, "scripted_call": float(self.calls)}

    def lr_multipliers(self, step):
        return {"base_ffn": 0.5}

    def log_items(self, step):
        return {"scripted_step": float(step)}

    def export(self, model):
        return model


def run(tmp_path, tokenizer, extra, accumulation=1):
    cfg = make_cfg(tmp_path, "dense_lora", max_steps=6, logging_steps=1, lr_scheduler_type="linear",
                   learning_rate=1e-3, lora_learning_rate=2e-3, per_device_batch_size=4 // accumulation,
                   gradient_accumulation_steps=accumulation)
    model = small_model()
    runtime = ScriptedRuntime(model, extra)
    snapshots = {}
    trainer = build_trainer(cfg, model, tokenizer, token_dataset(), SFTCollator(tokenizer), strategy_runtime=runtime)
    original_rebuild = trainer.rebuild_optimizer

    def rebuild():
        snapshots["attn"] = {n: p.detach().clone() for n, p in model.named_parameters() if ".self_attn." in n}
        return original_rebuild()

    trainer.rebuild_optimizer = rebuild
    trainer.add_callback(RecordLrs(trainer, snapshots.setdefault("lrs", [])))  # runs after the strategy hook
    trainer.train()
    return trainer, snapshots


class RecordLrs(TrainerCallback):
    def __init__(self, trainer, into):
        self.trainer, self.into = trainer, into

    def on_step_begin(self, args, state, control, **kwargs):
        scheduled = self.trainer.lr_scheduler.get_last_lr()
        self.into.append([(g["kind"], g["lr"], lr) for g, lr in zip(self.trainer.torch_optimizer.param_groups,
                                                                    scheduled)])


def test_phase_change_rebuilds_with_kinds_multipliers_and_logs(tmp_path, tokenizer):
    trainer, snapshots = run(tmp_path / "a", tokenizer, extra=0.0)
    assert {g["kind"] for g in trainer.torch_optimizer.param_groups} == {"lora", "base_ffn"}
    lrs = snapshots["lrs"]
    assert {kind for kind, _, _ in lrs[2]} == {"lora"} and {kind for kind, _, _ in lrs[3]} == {"lora", "base_ffn"}
    # Linear decay over 6 steps: step 3 runs at half the base lr; base_ffn gets its 0.5 multiplier on top.
    for kind, lr, scheduled in lrs[3]:
        base = 2e-3 if kind == "lora" else 1e-3
        assert scheduled == pytest.approx(base * 3 / 6)
        assert lr == pytest.approx(scheduled * (0.5 if kind == "base_ffn" else 1.0))
    initial = {n: p for n, p in small_model().named_parameters() if ".self_attn." in n}
    for name, value in snapshots["attn"].items():
        assert torch.equal(value, initial[name].detach()), f"{name} trained before its phase"
        assert not torch.equal(dict(trainer.model.named_parameters())[name].detach(), value), name
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["scripted_extra"] == 0.0 and last["scripted_step"] == 5.0  # the 6th step has index 5
    # The trainer hands each batch's attention mask to the runtime before the forward.
    runtime = trainer.strategy_runtime
    assert len(runtime.masks) == runtime.calls == 6
    assert all(m is not None and tuple(m.shape) == (4, 12) for m in runtime.masks)
    # Logged values are means over the micro-batches since the previous line (logging_steps=1 here).
    assert [h["scripted_call"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_logged_strategy_values_average_the_micro_batches(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "dense_lora", max_steps=4, logging_steps=2, per_device_batch_size=2,
                   gradient_accumulation_steps=2)
    model = small_model()
    trainer = build_trainer(cfg, model, tokenizer, token_dataset(), SFTCollator(tokenizer),
                            strategy_runtime=ScriptedRuntime(model, 0.0))
    trainer.train()
    # Lines at steps 2 and 4, each over 2 steps x 2 micro-batches: calls 1..4 and 5..8.
    assert [h["scripted_call"] for h in trainer.state.log_history if "loss" in h] == [2.5, 6.5]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_extra_loss_is_added_once_per_optimizer_step(tmp_path, tokenizer, accumulation):
    plain, _ = run(tmp_path / "a", tokenizer, extra=0.0, accumulation=accumulation)
    shifted, _ = run(tmp_path / "b", tokenizer, extra=1.0, accumulation=accumulation)
    a = [h["loss"] for h in plain.state.log_history if "loss" in h]
    b = [h["loss"] for h in shifted.state.log_history if "loss" in h]
    assert b == pytest.approx([x + 1.0 for x in a], abs=1e-4)


@pytest.mark.parametrize("save_steps", [3, 2])  # after the change at step 2; exactly at it
def test_phased_strategy_resumes_into_its_phase(tmp_path, tokenizer, save_steps):
    """A checkpoint taken after a phase change, or at the change (its optimizer still holds the old
    phase's groups), resumes with that phase's optimizer and ends with equal weights."""
    import shutil

    from molf.train.build import align_strategy_with_checkpoint, attach_strategy, resolve_resume

    phases = [{"step": 0, "trainable": ["router", "lora"]}, {"step": 2, "trainable": ["lora", "base_ffn"]}]
    common = dict(max_steps=5, save_strategy="steps", save_steps=save_steps, save_total_limit=None, num_experts=2,
                  expert_top_k=1, lora_rank=4, phases=phases)

    def trained(cfg, checkpoint=None):
        model = small_model()
        runtime = attach_strategy(model, cfg)
        trainer = build_trainer(cfg, model, tokenizer, token_dataset(num_rows=32), SFTCollator(tokenizer),
                                strategy_runtime=runtime)
        align_strategy_with_checkpoint(runtime, trainer.model, checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        return trainer

    full_cfg = make_cfg(tmp_path / "full", "moe_expert_lora", **common)
    full = trained(full_cfg)
    cut_cfg = make_cfg(tmp_path / "cut", "moe_expert_lora", resume_from_checkpoint="auto", **common)
    name = f"checkpoint-{save_steps}"
    shutil.copytree(full_cfg.run_dir / name, cut_cfg.run_dir / name)
    resumed = trained(cut_cfg, resolve_resume(cut_cfg))
    assert {g["kind"] for g in resumed.torch_optimizer.param_groups} == {"lora", "base_ffn"}
    expected = full.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("mode", ["mixture_lora", "moe_expert_lora", "dense_lora"])
def test_final_strategy_checkpoint_reloads_with_the_same_logits(mode, tmp_path, tokenizer):
    from molf.model.tiny import QWEN25_VOCAB_SIZE
    from molf.train.build import attach_strategy
    from molf.train.export import load_final, save_final

    cfg = make_cfg(tmp_path, mode, max_steps=3, num_experts=2, expert_top_k=1, lora_rank=4,
                   learning_rate=1e-2, lora_learning_rate=1e-2)
    model = small_model(vocab_size=QWEN25_VOCAB_SIZE)  # the Trainer writes the tokenizer's special ids
    runtime = attach_strategy(model, cfg)
    trainer = build_trainer(cfg, model, tokenizer, token_dataset(), SFTCollator(tokenizer), strategy_runtime=runtime)
    trainer.train()
    final, merged = save_final(trainer.model, tokenizer, cfg, runtime)
    inputs = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = merged.eval()(input_ids=inputs).logits
        got = load_final(final, cfg).eval()(input_ids=inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_strategy_log_items_describe_the_step_just_taken(tmp_path, tokenizer):
    from molf.train.build import attach_strategy

    phases = [{"step": 0, "trainable": ["router", "lora"]}, {"step": 2, "trainable": ["lora", "base_ffn"]}]
    cfg = make_cfg(tmp_path, "moe_expert_lora", max_steps=4, logging_steps=1, num_experts=2, expert_top_k=1,
                   lora_rank=4, phases=phases)
    model = small_model()
    runtime = attach_strategy(model, cfg)
    trainer = build_trainer(cfg, model, tokenizer, token_dataset(num_rows=32), SFTCollator(tokenizer),
                            strategy_runtime=runtime)
    trainer.train()
    phase_of_line = {h["step"]: h["strategy_phase"] for h in trainer.state.log_history if "loss" in h}
    assert phase_of_line == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}  # steps 1-2 (indices 0, 1) trained in phase 0
