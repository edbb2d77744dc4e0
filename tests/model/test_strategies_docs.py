"""The README's strategy section: its YAML examples validate, and its summary line is what the runtime prints."""

from __future__ import annotations

import re
import warnings

import pytest
import yaml
from conftest import REPO_ROOT, small_model

from molf.model.strategies import StrategyLoRAConfig, apply_strategy, validate_strategy

README = REPO_ROOT / "README.md"
SECTION = "## LoRA-strategy variants"
STRATEGY_KEYS = set(StrategyLoRAConfig.__dataclass_fields__)


def _section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else len(text)]


def _examples() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", _section(), flags=re.S)
    return [yaml.safe_load(block) for block in blocks]


def _strategy_cfg(example: dict) -> StrategyLoRAConfig:
    return StrategyLoRAConfig(**{k: v for k, v in example.items() if k in STRATEGY_KEYS})


def test_doc_has_phase_and_handoff_examples():
    examples = _examples()
    assert [e["mode"] for e in examples] == ["mixture_lora", "moe_expert_lora"]
    assert all("phases" in e for e in examples) and "handoff" in examples[1]


@pytest.mark.parametrize("index", [0, 1])
def test_examples_validate_without_warnings(index):
    """Also against the run's real length: the plan fits the example's max_steps."""
    example = _examples()[index]
    assert validate_strategy(_strategy_cfg(example), example["mode"], total_steps=example["max_steps"]) == []


@pytest.mark.parametrize("index", [0, 1])
def test_examples_parse_as_training_configs(tmp_path, index):
    from molf.config import parse_config

    path = tmp_path / "example.yaml"
    path.write_text(_section().split("```yaml\n")[index + 1].split("```")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a strategy warning would fail the example
        cfg = parse_config(["--config_path", str(path), "--validate_only", "True"])
    assert cfg.mode == _examples()[index]["mode"] and cfg.phases == _examples()[index]["phases"]


def test_summary_line_in_the_doc_is_real():
    example = _examples()[1]
    runtime = apply_strategy(small_model("qwen2"), _strategy_cfg(example), example["mode"])
    assert f"`{runtime.summary()}`" in _section().replace("\n", " ")
