from dataclasses import dataclass

import pytest
import torch
from conftest import small_model
from torch import nn

from molf.model import LoRAConfig, MoLFConfig, MoLFLinear, merge_and_unwrap, molf_modules, wrap_model_with_molf

FAMILIES = ["qwen2", "llama", "gemma3"]


@dataclass
class WrapConfig(MoLFConfig, LoRAConfig):
    pass


def _ids(n=9):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(3))


def _perturb_lora(model):
    with torch.no_grad():
        for _, m in molf_modules(model):
            for b in m.lora_B:
                b.normal_(std=0.5)
            m.weight.add_(0.01)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_equals_base_at_init(family):
    model = small_model(family).eval()
    ids = _ids()
    expected = model(ids).logits
    names = wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[4, 8]))
    assert len(names) == 2 * 7  # every linear of 2 layers; lm_head excluded
    assert all(isinstance(model.get_submodule(n), MoLFLinear) for n in names)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_wrapped_and_restores_names(family):
    model = small_model(family)
    original_keys = list(model.state_dict())
    wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[4, 8]))
    _perturb_lora(model)
    model.eval()
    ids = _ids()
    wrapped_logits = model(ids).logits
    merge_and_unwrap(model)
    assert not molf_modules(model)
    assert list(model.state_dict()) == original_keys
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    torch.testing.assert_close(model(ids).logits, wrapped_logits, rtol=1e-5, atol=1e-5)


def test_wrapped_state_dict_keys_are_original_plus_lora():
    model = small_model("llama")
    original = set(model.state_dict())
    names = wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[4, 8]))
    added = {f"{n}.lora_{ab}.{i}" for n in names for ab in "AB" for i in (0, 1)}
    assert set(model.state_dict()) == original | added


def test_tied_embeddings_stay_tied(tiny_qwen2):
    assert tiny_qwen2.lm_head.weight is tiny_qwen2.model.embed_tokens.weight
    wrap_model_with_molf(tiny_qwen2, WrapConfig(molf_lora_ranks=[4]))
    assert tiny_qwen2.lm_head.weight is tiny_qwen2.model.embed_tokens.weight
    merge_and_unwrap(tiny_qwen2)
    assert tiny_qwen2.lm_head.weight is tiny_qwen2.model.embed_tokens.weight


def test_wrapping_a_tied_linear_raises(tiny_qwen2):
    with pytest.raises(ValueError, match="tied"):
        wrap_model_with_molf(tiny_qwen2, WrapConfig(molf_exclude_modules=[]))


def test_target_suffixes_and_exclusions(tiny_llama):
    cfg = WrapConfig(molf_target_modules=["q_proj", "v_proj"], molf_exclude_modules=["layers.1.self_attn.v_proj"])
    names = wrap_model_with_molf(tiny_llama, cfg)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj"]


def test_nothing_matches_raises(tiny_llama):
    with pytest.raises(ValueError, match="no linear matches"):
        wrap_model_with_molf(tiny_llama, WrapConfig(molf_target_modules=["qkv_proj"]))


def test_molf_e_freezes_base(tiny_qwen2):
    names = wrap_model_with_molf(tiny_qwen2, WrapConfig(molf_fft=False, molf_lora_ranks=[4, 8]))
    for name in names:
        module = tiny_qwen2.get_submodule(name)
        assert not module.weight.requires_grad
        assert module.bias is None or not module.bias.requires_grad
        assert module.expert_kinds() == ["lora", "lora"]
    assert tiny_qwen2.model.embed_tokens.weight.requires_grad  # freezing non-linears is a separate flag


def test_freeze_non_linear_freezes_embeddings_and_norms(tiny_gemma3):
    wrap_model_with_molf(tiny_gemma3, WrapConfig(molf_fft=False, molf_freeze_non_linear=True))
    trainable = {n for n, p in tiny_gemma3.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not tiny_gemma3.model.embed_tokens.weight.requires_grad
    assert not tiny_gemma3.model.norm.weight.requires_grad


def test_merge_without_molf_modules_raises(tiny_llama):
    with pytest.raises(ValueError, match="no MoLFLinear"):
        merge_and_unwrap(tiny_llama)


def test_linears_under_plain_containers():
    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.ReLU()]), nn.Linear(4, 2))
    names = wrap_model_with_molf(model, WrapConfig(molf_exclude_modules=["1"], molf_lora_ranks=[2]))
    assert names == ["0.0"]
    assert isinstance(model[0][0], MoLFLinear)


def test_expert_alpha_is_the_reference_32_for_every_rank_unless_given():
    """The reference's MoLF mode gives every LoRA expert ``lora_alpha`` (default 32): with rsLoRA,
    rank 128 gets s = 32 / sqrt(128); the effective-scale heuristic belongs to LoRA mode only."""
    model = small_model("qwen2")
    wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[32, 128]))
    _, module = molf_modules(model)[0]
    assert module.lora_alpha == [32.0, 32.0]
    assert module.scaling == pytest.approx([32 / 32 ** 0.5, 32 / 128 ** 0.5])
    given = small_model("qwen2")
    wrap_model_with_molf(given, WrapConfig(molf_lora_ranks=[128], lora_alpha=16.0, use_rslora=False))
    assert molf_modules(given)[0][1].scaling == pytest.approx([16 / 128])
