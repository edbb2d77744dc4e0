"""Tiny causal LMs built from configs (no weights, no network) for tests, demos and benchmarks.

``model_name_or_path`` values of the form ``tiny-<family>`` (for example ``tiny-qwen2``) are
resolved here instead of on the hub; ``tiny-<family>:key=value,key=value`` overrides config fields.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

TINY_PREFIX = "tiny-"

# Qwen2.5's tokenizer has 151,665 ids; tiny models use it as is so prompts tokenize exactly as in the paper.
QWEN25_VOCAB_SIZE = 151_665
_VENDORED_EOS_ID, _VENDORED_PAD_ID = 151_645, 151_643

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    vocab_size=QWEN25_VOCAB_SIZE,
)


def _config_class(family: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "gemma3": Gemma3TextConfig, "qwen3": Qwen3Config}
    if family not in classes:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(classes)}")
    return classes[family]


def tiny_config(family: str = "qwen2", **overrides: Any) -> PretrainedConfig:
    """Return a small config of ``family`` (qwen2, llama, gemma3, qwen3).

    Qwen2 keeps its q/k/v biases; Llama has none; Gemma3 gets ``head_dim`` consistent with the
    hidden size. At the Qwen2.5 vocabulary size, EOS is the vendored tokenizer's. Any config field can
    be overridden.
    """
    fields = dict(_COMMON)
    if family in ("gemma3", "qwen3"):
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if family == "qwen2":
        fields["tie_word_embeddings"] = True
    fields.update(overrides)
    if fields["vocab_size"] == QWEN25_VOCAB_SIZE:
        # The vendored tokenizer's EOS (<|im_end|>); its PAD is set by build_tiny_model.
        fields.setdefault("eos_token_id", _VENDORED_EOS_ID)
    if "head_dim" in fields and "hidden_size" in overrides and "head_dim" not in overrides:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return _config_class(family)(**fields)


def parse_tiny_name(name: str) -> tuple[str, dict[str, Any]]:
    """Split ``tiny-qwen2:hidden_size=128,num_hidden_layers=4`` into family and overrides."""
    if not name.startswith(TINY_PREFIX):
        raise ValueError(f"{name!r} is not a tiny model name (expected '{TINY_PREFIX}<family>[:k=v,...]')")
    family, _, spec = name[len(TINY_PREFIX):].partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad override {item!r} in {name!r}: write key=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return family, overrides


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def check_tiny_name(name: str) -> list[str]:
    """Check a ``tiny-<family>[:key=value,...]`` name without building anything; returns warnings.

    Raises:
        ValueError: an unknown family, a malformed override, or a text value for a numeric field.
    """
    family, overrides = parse_tiny_name(name)
    defaults = _config_class(family)()
    messages = []
    for key, value in overrides.items():
        default = getattr(defaults, key, None)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name!r}: {key} takes a number, got {value!r}")
        if not hasattr(defaults, key) and key not in _PASSED_THROUGH:
            messages.append(f"{name!r}: {key!r} is not a field of {type(defaults).__name__}; it is passed to the "
                            "config as is, which most likely ignores it (check the spelling)")
    return messages


# Read by the models although their config classes do not define them by default.
_PASSED_THROUGH = ("head_dim", "rope_theta", "attention_bias")


def is_tiny_name(name: str) -> bool:
    return name.startswith(TINY_PREFIX)


def build_tiny_model(name_or_family: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides: Any):
    """Build a randomly initialised tiny causal LM, deterministically from ``seed``."""
    if is_tiny_name(name_or_family):
        family, parsed = parse_tiny_name(name_or_family)
        overrides = {**parsed, **overrides}
    else:
        family = name_or_family
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager" if family == "gemma3" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.vocab_size == QWEN25_VOCAB_SIZE and "pad_token_id" not in overrides:
        # The vendored tokenizer's PAD (<|endoftext|>), set after construction as the Trainer would
        # (so that it finds the config aligned and says nothing): a PAD id in the config at construction
        # time would make it the embedding's padding_idx (zero row, no gradient), unlike Qwen2.5's own
        # checkpoints, which have no pad_token_id.
        model.config.pad_token_id = _VENDORED_PAD_ID
        if model.generation_config is not None:
            model.generation_config.pad_token_id = _VENDORED_PAD_ID
    return model
