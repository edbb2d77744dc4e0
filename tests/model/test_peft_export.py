"""PEFT-format export: PeftModel.from_pretrained on the base model reproduces the trained logits."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import small_model

from molf.model.config import LoRAConfig, MoLFConfig
from molf.model.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft_adapter
from molf.model.strategies import StrategyLoRAConfig, apply_strategy

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _randomize_adapters(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_logits(out_dir, family: str):
    from peft import PeftModel

    base = small_model(family).eval()
    return PeftModel.from_pretrained(base, out_dir).eval()(IDS).logits


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_dense_lora_adapter_reproduces_logits(tmp_path, family):
    model = small_model(family)
    cfg = StrategyLoRAConfig(attn_lora=True, lora_rank=4, lora_dropout=0.1, use_rslora=True)
    apply_strategy(model, cfg, "dense_lora")
    _randomize_adapters(model)
    model.eval()
    expected = model(IDS).logits
    assert (expected - small_model(family).eval()(IDS).logits).abs().max() > 1e-3  # adapters matter
    save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["use_rslora"] is False
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()
    torch.testing.assert_close(_peft_logits(tmp_path, family), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def molf_e_model():
    from molf.model.wrap import wrap_model_with_molf

    @dataclass
    class Cfg(MoLFConfig, LoRAConfig):
        pass

    cfg = Cfg(molf_lora_ranks=[2, 6], molf_fft=False, molf_freeze_non_linear=True, lora_dropout=0.0,
              molf_target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    model = small_model("qwen2")
    wrap_model_with_molf(model, cfg)
    _randomize_adapters(model)
    return model.eval()


def test_molf_e_experts_concatenate_into_one_adapter(tmp_path, molf_e_model):
    expected = molf_e_model(IDS).logits
    save_peft_adapter(molf_e_model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == 8  # 2 + 6
    torch.testing.assert_close(_peft_logits(tmp_path, "qwen2"), expected, atol=1e-5, rtol=1e-5)


def test_peft_lora_model_round_trips(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_model("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    _randomize_adapters(model)
    model.eval()
    expected = model(IDS).logits
    save_peft_adapter(model, tmp_path)
    torch.testing.assert_close(_peft_logits(tmp_path, "qwen2"), expected, atol=1e-5, rtol=1e-5)


def test_molf_with_fft_expert_is_refused(tmp_path):
    from molf.model.wrap import wrap_model_with_molf

    @dataclass
    class Cfg(MoLFConfig, LoRAConfig):
        pass

    model = small_model("qwen2")
    wrap_model_with_molf(model, Cfg(molf_target_modules=["q_proj"], molf_lora_ranks=[2]))
    with pytest.raises(ValueError, match="FFT expert"):
        save_peft_adapter(model, tmp_path)


@pytest.mark.parametrize("mode", ["mixture_lora", "moe_expert_lora"])
def test_routed_strategies_are_refused(tmp_path, mode):
    model = small_model("qwen2")
    apply_strategy(model, StrategyLoRAConfig(lora_rank=2, num_experts=2, expert_top_k=1), mode)
    with pytest.raises(ValueError, match="no PEFT LoRA equivalent"):
        save_peft_adapter(model, tmp_path)


def test_plain_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear or MoLFLinear"):
        save_peft_adapter(small_model("qwen2"), tmp_path)


@pytest.mark.parametrize("phases, warns", [([{"step": 0, "trainable": ["lora"]}], False),
                                           ([{"step": 0, "trainable": ["lora", "base_ffn"]},
                                             {"step": 3, "trainable": ["lora"]}], True)])
def test_dense_lora_base_weights_trained_in_an_earlier_phase_are_warned_about(tmp_path, phases, warns):
    import warnings

    from molf.config import TrainingConfig
    from molf.train.export import merged_model

    model = small_model()
    cfg = TrainingConfig(model_name_or_path="tiny-qwen2", mode="dense_lora", lora_rank=4, phases=phases)
    runtime = apply_strategy(model, cfg, "dense_lora")
    for step in range(5):  # the base FFN trains in steps 0-2 (second plan), then is frozen again
        runtime.on_step_begin(model, step)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged_model(model, cfg, tmp_path, runtime)
    messages = [str(w.message) for w in caught if "not in the PEFT adapter" in str(w.message)]
    assert bool(messages) == warns, messages
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).is_file()
