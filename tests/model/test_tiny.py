"""Tiny models built from configs: their special tokens are the vendored tokenizer's."""

from __future__ import annotations

import pytest

from molf.model.tiny import build_tiny_model, tiny_config


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3", "qwen3"])
def test_tiny_models_carry_the_vendored_tokenizers_eos_and_pad(family, tokenizer):
    model = build_tiny_model(f"tiny-{family}")
    config = model.config
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # PAD came after construction: no embedding row is a frozen padding row, as in Qwen2.5's checkpoints.
    assert model.get_input_embeddings().padding_idx in (None, tiny_config(family).pad_token_id)
    assert model.get_input_embeddings().padding_idx != tokenizer.pad_token_id
    # A smaller vocabulary cannot hold those ids: the family's defaults stay, and overrides win.
    assert tiny_config(family, vocab_size=128).eos_token_id != tokenizer.eos_token_id
    assert tiny_config(family, eos_token_id=7).eos_token_id == 7
