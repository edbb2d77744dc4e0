"""Shared fixtures: tiny models built from configs, the vendored tokenizer, fixture paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from molf.model.tiny import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
TOKENIZER_DIR = REPO_ROOT / "assets" / "tokenizer" / "qwen2.5"

# Small enough for unit tests to run in milliseconds; vocab 128 keeps embeddings tiny.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


def small_model(family: str = "qwen2", seed: int = 0, **overrides):
    return build_tiny_model(family, seed=seed, **{**SMALL, **overrides})


@pytest.fixture
def tiny_qwen2():
    """Qwen2 with q/k/v biases and tied embeddings."""
    return small_model("qwen2")


@pytest.fixture
def tiny_llama():
    return small_model("llama")


@pytest.fixture
def tiny_gemma3():
    return small_model("gemma3")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
