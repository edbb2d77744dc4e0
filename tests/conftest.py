"""Shared fixtures: tiny models built from configs, the vendored tokenizer, fixture paths."""

from __future__ import annotations

import json
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


# Synthetic routing logs (molf.analysis tests) whose statistics are known by construction.
TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def routing_module_names(num_layers: int) -> list[str]:
    names = []
    for layer in range(num_layers):
        for leaf in TYPES:
            block = "self_attn" if leaf in ATTN else "mlp"
            names.append(f"model.layers.{layer}.{block}.{leaf}")
    return names


def write_ours(path: Path, num_steps: int, num_layers: int, experts=("fft", "lora0_r128"),
               ranks=(None, 128)) -> Path:
    """Attention modules: expert 0 wins every step (score 2 vs 1). MLP modules: expert 0 wins on the
    first half of the steps, expert 1 afterwards (exactly one switch each)."""
    modules = routing_module_names(num_layers)
    header = {"type": "header", "version": 1, "modules": modules, "experts": list(experts),
              "ranks": list(ranks), "score_fn": "true_projected", "topk": 1, "every": 1}
    attn = [m.rsplit(".", 1)[-1] in ATTN for m in modules]
    with path.open("w") as handle:
        handle.write(json.dumps(header) + "\n")
        for step in range(num_steps):
            late = step >= num_steps // 2
            winners = [[0] if a or not late else [1] for a in attn]
            scores = [[2.0, 1.0] if w == [0] else [1.0, 2.0] for w in winners]
            handle.write(json.dumps({"type": "step", "step": step, "winners": winners, "scores": scores}) + "\n")
    return path


@pytest.fixture
def write_routing_log():
    return write_ours
