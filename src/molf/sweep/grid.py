"""The paper's hyper-parameter grids (DESIGN section 5), the one definition behind ``slurm/`` and
``scripts/sweep.py``.

A grid is fixed flags plus axes; its jobs are the Cartesian product of the axes in declaration
order (the first axis varies slowest), so an array index always names the same configuration.
Flags are the ``src/script/train.py`` flags; paths (``ckpt_dir_root``, ``results_dir``, ...) are
added by whoever runs the job.

Choices not fixed by the paper's appendix, kept equal across methods:
- weight decay 0.1 for the FFT expert / FFT, 0.01 for LoRA experts / LoRA (the paper's quickstart);
- rsLoRA for every LoRA (quickstart ``--use_rslora True``), alpha from the default effective scale;
- MoLF: EPD score (``true_projected``), K=1, one LoRA expert of rank 128, FFT lrs x LoRA lrs;
- MoLF-E: LoRA experts of ranks 32 and 128, LoRA lrs only (there is no FFT expert), base frozen,
  non-linear parameters trainable (``molf_freeze_non_linear`` left False);
- seed 42 for every run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

MODELS = ["google/gemma-3-1b-pt", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-3B"]
TASKS = ["sql", "med", "fact"]
FFT_LRS = [1e-4, 5e-5, 2e-5]
LORA_LRS = [5e-4, 5e-5]
SCHEDULERS = ["cosine", "linear"]
COMMON = {"per_device_batch_size": 8, "gradient_accumulation_steps": 4, "num_train_epochs": 2,
          "warm_up_ratio": 0.1, "seed": 42}
FFT_WD, LORA_WD = 0.1, 0.01


def format_flag_value(value: Any) -> str:
    """A flag value as draccus parses it: ``5e-05``, ``True``, ``[32,128]``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_flag_value(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Job:
    """One configuration of a grid: its position and its flags."""

    grid: str
    index: int
    flags: dict[str, Any]

    @property
    def task(self) -> str:
        return self.flags["dataset_type"]

    def args(self) -> list[str]:
        """The flags as ``["--name", "value", ...]`` for ``src/script/train.py``."""
        out: list[str] = []
        for name, value in self.flags.items():
            out += [f"--{name}", format_flag_value(value)]
        return out


@dataclass(frozen=True)
class Grid:
    """Fixed flags plus axes (flag -> values); jobs are the product of the axes, first axis slowest."""

    name: str
    description: str
    fixed: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        size = 1
        for values in self.axes.values():
            size *= len(values)
        return size

    def configurations(self) -> list[dict[str, Any]]:
        names = list(self.axes)
        return [{**self.fixed, **dict(zip(names, values))}
                for values in itertools.product(*(self.axes[n] for n in names))]


def _axes(**lrs: list[Any]) -> dict[str, list[Any]]:
    return {"model_name_or_path": MODELS, "dataset_type": TASKS, **lrs, "lr_scheduler_type": SCHEDULERS}


BASE_GRIDS = [
    Grid("fft", "full fine-tuning: 3 lrs x 2 schedules",
         {"mode": "fft", "weight_decay": FFT_WD, **COMMON},
         _axes(learning_rate=FFT_LRS)),
    Grid("lora", "LoRA r32 (rsLoRA): 2 lrs x 2 schedules",
         {"mode": "lora", "lora_rank": 32, "use_rslora": True, "lora_weight_decay": LORA_WD, **COMMON},
         _axes(lora_learning_rate=LORA_LRS)),
    Grid("molf", "MoLF (FFT + LoRA r128, EPD, K=1): 3 FFT lrs x 2 LoRA lrs x 2 schedules",
         {"mode": "molf", "molf_lora_ranks": [128], "molf_score_fn": "true_projected", "molf_topk": 1,
          "use_rslora": True, "weight_decay": FFT_WD, "lora_weight_decay": LORA_WD, **COMMON},
         _axes(learning_rate=FFT_LRS, lora_learning_rate=LORA_LRS)),
    Grid("molf_e", "MoLF-E (LoRA r32 + r128, base frozen, EPD, K=1): 2 LoRA lrs x 2 schedules",
         {"mode": "molf_e", "molf_lora_ranks": [32, 128], "molf_score_fn": "true_projected", "molf_topk": 1,
          "use_rslora": True, "lora_weight_decay": LORA_WD, **COMMON},
         _axes(lora_learning_rate=LORA_LRS)),
]
# "paper" is the four grids one after another, in the order above.
GRID_NAMES = [g.name for g in BASE_GRIDS] + ["paper"]


def grid_jobs(name: str) -> list[Job]:
    """Every job of grid ``name`` (``fft``, ``lora``, ``molf``, ``molf_e`` or ``paper``), indexed from 0."""
    if name not in GRID_NAMES:
        raise ValueError(f"unknown grid {name!r}; choose one of {GRID_NAMES}")
    grids = BASE_GRIDS if name == "paper" else [g for g in BASE_GRIDS if g.name == name]
    configurations = [c for g in grids for c in g.configurations()]
    return [Job(name, i, flags) for i, flags in enumerate(configurations)]


def grid_description(name: str) -> str:
    if name == "paper":
        return "the paper's four grids (fft, lora, molf, molf_e) in one array"
    return next(g.description for g in BASE_GRIDS if g.name == name)
