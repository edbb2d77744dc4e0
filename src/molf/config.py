"""The top-level config of a training run: every component's flags, flat.

``TrainingConfig`` inherits from each component's dataclass (DESIGN section 3, docs/DEVELOPING.md),
so ``--molf_lora_ranks "[32,128]"`` and ``--learning_rate 5e-5`` are both top-level flags. Parsing
validates everything that can be checked without loading a model and creates nothing on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Sequence

from molf.data.config import DataConfig
from molf.eval.config import EvalConfig
from molf.model.config import LoRAConfig, MoLFConfig
from molf.model.strategies.config import StrategyConfig
from molf.optim.config import OptimConfig
from molf.train.config import MOLF_MODES, STRATEGY_MODES, TrainConfig

# Fields that change where things go or what is printed, not what is trained: left out of the run
# name's hash so that re-running (or resuming) the same training lands in the same directory.
_NOT_IDENTITY = frozenset({
    "ckpt_dir_root", "log_dir_root", "logging_steps", "report_to", "save_strategy", "save_steps",
    "save_total_limit", "clean_ckpt_at_end", "only_eval", "validate_only", "preflight",
    "resume_from_checkpoint", "overwrite_run_dir", "dataloader_num_workers", "routing_log_every",
    "gradient_checkpointing",
    "attn_implementation", "eval_data_path", "do_eval", "num_eval_samples", "eval_batch_size",
    "max_new_tokens", "results_dir", "sql_timeout_s", "spider_databases_dir", "molf_score_backend",
})
_MOLF_FIELDS = ("molf_lora_ranks", "molf_fft", "molf_freeze_non_linear", "molf_target_modules",
                "molf_exclude_modules", "molf_score_fn", "molf_topk", "molf_score_backend")
_SCORE_TAGS = {"true_projected": "epd", "projected": "pfn"}
# Fields with a results column of their own (``to_run_info``), left out of its ``other_hparams``.
_OWN_COLUMNS = frozenset({
    "mode", "model_name_or_path", "dataset_type", "learning_rate", "lora_learning_rate", "weight_decay",
    "lora_weight_decay", "lora_rank", "molf_lora_ranks", "molf_topk", "molf_score_fn", "lr_scheduler_type",
    "warm_up_ratio", "num_train_epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps",
    "seed",
})


@dataclass
class TrainingConfig(TrainConfig, DataConfig, EvalConfig, OptimConfig, MoLFConfig, LoRAConfig, StrategyConfig):
    """Every flag of a run; see each component's config for the meaning of its fields."""

    # Whether MoLF keeps the FFT expert. Unset, it follows --mode (True for molf, False for molf_e);
    # --mode molf --molf_fft False is the reference's spelling of --mode molf_e.
    molf_fft: Optional[bool] = None

    def __post_init__(self) -> None:
        for component in (TrainConfig, DataConfig, EvalConfig, OptimConfig, MoLFConfig, LoRAConfig, StrategyConfig):
            component.__post_init__(self)
        self._normalize_mode()
        self._check_molf_flags()
        self._check_environment()
        for message in self._ignored_knobs():
            warnings.warn(message, stacklevel=2)

    def _normalize_mode(self) -> None:
        # The reference spells MoLF-E as --mode molf --molf_fft False; both spellings name one run.
        if self.mode == "molf" and self.molf_fft is False:
            self.mode = "molf_e"
        if self.mode == "molf_e" and self.molf_fft is True:
            raise ValueError("--mode molf_e has no FFT expert, so --molf_fft True contradicts it: drop "
                             "--molf_fft, or use --mode molf to train the FFT expert")
        if self.mode in MOLF_MODES:
            self.molf_fft = self.mode == "molf"

    def _check_molf_flags(self) -> None:
        if self.handoff is not None and self.mode not in STRATEGY_MODES:
            raise ValueError(f"handoff is for --mode moe_expert_lora only (mode is {self.mode!r}); remove the "
                             "handoff section or change --mode")
        if self.mode in MOLF_MODES:
            if self.molf_topk > self.molf_num_experts:
                raise ValueError(
                    f"molf_topk={self.molf_topk} exceeds the {self.molf_num_experts} experts per module "
                    f"({self.molf_expert_names()}); lower --molf_topk or add ranks to --molf_lora_ranks"
                )
            self._check_score_fn()
            return
        defaults = _defaults()
        changed = [name for name in _MOLF_FIELDS if getattr(self, name) != getattr(defaults, name)]
        # A resolved_config.yaml holds molf_fft: true for every mode that is not MoLF-E.
        changed = [name for name in changed if not (name == "molf_fft" and self.molf_fft is True)]
        if changed:
            raise ValueError(
                f"{', '.join(changed)}: MoLF flags, used only by --mode molf / molf_e (mode is {self.mode!r}); "
                "remove these flags (from the command line or the --config_path YAML) or change --mode"
            )
        self.molf_fft = True  # a fixed value, so that the run name does not depend on how it was spelled
        if self.mode in STRATEGY_MODES:
            self._check_strategy()

    def _check_score_fn(self) -> None:
        from molf.optim.scores import SCORE_FNS

        known = sorted(SCORE_FNS)
        if self.molf_score_fn not in known:
            raise ValueError(f"unknown molf_score_fn {self.molf_score_fn!r}; choose one of {known}")

    def _check_strategy(self) -> None:
        from molf.model.strategies import validate_strategy

        # With --max_steps the step-range rules (a phase or fade past the last step) apply here already,
        # so --validate_only catches them; with epochs they wait for the trainer's step count.
        for message in validate_strategy(self, self.mode, self.max_steps if self.max_steps > 0 else None):
            warnings.warn(message, stacklevel=3)

    def _check_environment(self) -> None:
        needs = {"flash_attention_2": "flash_attn"} if self.attn_implementation == "flash_attention_2" else {}
        if self.molf_score_backend == "triton" and self.mode in MOLF_MODES:
            needs["molf_score_backend triton"] = "triton"
        if self.report_to in ("tensorboard", "wandb"):
            needs[f"report_to {self.report_to}"] = self.report_to
        for what, module in needs.items():
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"{what} needs the {module!r} package: pip install {module.replace('_', '-')}, "
                                 "or pick another value")
        if self.validate_only and self.preflight:
            raise ValueError("--validate_only and --preflight exclude each other: pick one")
        if self.only_eval:
            clash = [flag for flag, value in (("--resume_from_checkpoint", self.resume_from_checkpoint),
                                              ("--preflight True", self.preflight),
                                              ("--overwrite_run_dir True", self.overwrite_run_dir),
                                              ("--do_eval False", not self.do_eval)) if value]
            if clash:
                raise ValueError(f"--only_eval evaluates <run_dir>/final and nothing else; drop {', '.join(clash)}")
        if self.model_name_or_path.startswith("tiny-"):  # an unknown family or setting fails here, not after loading
            from molf.model.tiny import check_tiny_name

            for message in check_tiny_name(self.model_name_or_path):
                warnings.warn(message, stacklevel=3)

    def _ignored_knobs(self) -> list[str]:
        defaults, messages = _defaults(), []
        ignored = {
            "fft": ("lora_learning_rate", "lora_weight_decay", "lora_rank", "lora_alpha", "lora_dropout"),
            "lora": ("learning_rate", "weight_decay"),
            "molf": ("lora_rank",),
            "molf_e": ("lora_rank",) + (("learning_rate", "weight_decay") if self.molf_freeze_non_linear else ()),
        }.get(self.mode, ())
        if self.mode not in STRATEGY_MODES:
            ignored += tuple(f.name for f in dataclasses.fields(StrategyConfig))
        for name in ignored:
            if getattr(self, name) != getattr(defaults, name):
                messages.append(f"--{name} is ignored in mode {self.mode}")
        return messages

    # ---- derived values ----

    @property
    def run_name(self) -> str:
        """Readable hyper-parameters plus a hash of every field that changes the training, for the
        number of processes of this launch (``launch_world_size``)."""
        return self.run_name_for(launch_world_size())

    def run_name_for(self, world_size: int) -> str:
        """``run_name`` of this config trained by ``world_size`` processes: their number multiplies the
        batch (``bs8x4x2``: 8 per device, 4 accumulation steps, 2 processes) and enters the hash, so a
        DDP run never shares the directory of a single-process run of the same flags."""
        parts = [self.mode, _model_tag(self.model_name_or_path), self.dataset_type]
        if self.mode != "lora":
            parts += [f"lr{self.learning_rate:g}", f"wd{self.weight_decay:g}"]
        if self.mode != "fft":
            parts += [f"llr{self.lora_learning_rate:g}", f"lwd{self.lora_weight_decay:g}"]
        if self.mode in MOLF_MODES:
            parts += ["r" + "-".join(str(r) for r in self.molf_lora_ranks), f"k{self.molf_topk}",
                      _SCORE_TAGS.get(self.molf_score_fn, self.molf_score_fn)]
        elif self.mode != "fft":
            parts.append(f"r{self.lora_rank}")
        length = f"st{self.max_steps}" if self.max_steps > 0 else f"ep{self.num_train_epochs:g}"
        parts += [self.lr_scheduler_type, f"wu{self.warm_up_ratio:g}", length,
                  f"bs{self.per_device_batch_size}x{self.gradient_accumulation_steps}"
                  + (f"x{world_size}" if world_size > 1 else ""), f"s{self.seed}", self.identity_hash(world_size)]
        return "_".join(parts)

    def identity_fields(self, world_size: int = 1) -> dict[str, Any]:
        """Every field that changes what is trained, by name (and the process count, when above 1)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}
        if self.drop_eval_overlap:  # the eval questions then decide which training rows are kept
            fields["eval_data_path"] = self.eval_data_path
        if world_size > 1:  # left out at 1, so single-process names are what they always were
            fields["world_size"] = world_size
        return fields

    def identity_hash(self, world_size: int = 1) -> str:
        """8 hex digits of SHA-1 over ``identity_fields``."""
        fields = self.identity_fields(world_size)
        return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        return Path(self.ckpt_dir_root) / self.run_name

    @property
    def log_dir(self) -> Path:
        return Path(self.log_dir_root) / self.run_name

    def to_run_info(self, world_size: Optional[int] = None) -> dict[str, Any]:
        """The run columns of the results CSVs (docs/DEVELOPING.md); None where the mode has no such knob.
        ``world_size``: the processes that trained the run (default: this launch's)."""
        world_size = launch_world_size() if world_size is None else world_size
        molf, lora_like = self.mode in MOLF_MODES, self.mode not in ("fft",) + MOLF_MODES
        return {
            "run_name": self.run_name_for(world_size),
            "mode": self.mode,
            "model": self.model_name_or_path,
            "dataset": self.dataset_type,
            "learning_rate": None if self.mode == "lora" else self.learning_rate,
            "lora_learning_rate": None if self.mode == "fft" else self.lora_learning_rate,
            "weight_decay": None if self.mode == "lora" else self.weight_decay,
            "lora_weight_decay": None if self.mode == "fft" else self.lora_weight_decay,
            "lora_rank": self.lora_rank if lora_like else None,
            "molf_lora_ranks": "[" + ",".join(str(r) for r in self.molf_lora_ranks) + "]" if molf else None,
            "molf_topk": self.molf_topk if molf else None,
            "molf_score_fn": self.molf_score_fn if molf else None,
            "lr_scheduler_type": self.lr_scheduler_type,
            "warm_up_ratio": self.warm_up_ratio,
            "num_train_epochs": None if self.max_steps > 0 else self.num_train_epochs,
            "max_steps": self.max_steps if self.max_steps > 0 else None,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "seed": self.seed,
            "other_hparams": json.dumps(self.other_hparams(world_size), sort_keys=True, default=str),
            "checkpoint": str(Path(self.ckpt_dir_root) / self.run_name_for(world_size) / "final"),
        }

    def other_hparams(self, world_size: Optional[int] = None) -> dict[str, Any]:
        """The fields in the run's identity that differ from their defaults and have no results column
        of their own (e.g. ``data_path``, ``lora_alpha``, ``precision``, ``max_seq_length``; and
        ``world_size`` for a launch of several processes)."""
        defaults, flags = _defaults(), TrainingConfig.__dataclass_fields__
        world_size = launch_world_size() if world_size is None else world_size
        fields = {k: v for k, v in self.identity_fields(world_size).items()
                  if k not in _OWN_COLUMNS and (k not in flags or v != getattr(defaults, k))}
        # Set by the mode, not by the user: --mode molf_e says it already.
        fields.pop("molf_fft", None)
        return fields

    def dump_yaml(self, stream: IO[str]) -> None:
        """Write the config as YAML that ``--config_path`` reads back to an equal config."""
        import draccus

        draccus.dump(self, stream)


def _defaults() -> "_DefaultView":
    return _DefaultView()


class _DefaultView:
    """The declared defaults of TrainingConfig's fields, without running any __post_init__."""

    def __getattr__(self, name: str) -> Any:
        field = TrainingConfig.__dataclass_fields__[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return field.default


def _model_tag(name: str) -> str:
    base = name.rstrip("/").split("/")[-1] or name
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", base)[:48]


# Flat list flags and the type each was declared with (``list[int]``, ``list[str]``, ...).
_LIST_FIELDS = {name: str(f.type) for name, f in TrainingConfig.__dataclass_fields__.items()
                if "list[" in str(f.type) and "dict" not in str(f.type)}


# An example value of each list flag, for the messages that ask for one.
_LIST_EXAMPLES = {"molf_lora_ranks": "[32,128]", "molf_target_modules": "[q_proj,v_proj]",
                  "molf_exclude_modules": "[lm_head]", "ffn_targets": "[gate_proj,up_proj,down_proj]",
                  "attn_targets": "[q_proj,v_proj]"}


def _bracket_list_flags(args: list[str]) -> list[str]:
    """Let list flags also be written without brackets on the command line: ``--molf_lora_ranks 32,128``
    and ``--molf_target_modules q_proj,v_proj`` (the form DESIGN section 1 uses) become ``[32,128]`` and
    ``["q_proj","v_proj"]`` (each name quoted, so YAML reads it as the string it is); an empty value is
    the empty list. Bracketed values and ``null`` / ``None`` are passed on for draccus to read.

    Raises:
        ValueError: an empty item (``32,,128``) or, in a list of integers, an item that is not one.
    """
    out: list[str] = []
    flag = None  # the list flag whose value comes next
    for item in args:
        name, eq, value = item.partition("=")
        if flag is not None and not item.startswith("--"):
            out.append(_bracketed(flag, item))
            flag = None
        elif item.startswith("--") and name[2:] in _LIST_FIELDS:
            flag = None
            if eq:
                out.append(f"{name}={_bracketed(name[2:], value)}")
            else:
                out.append(item)
                flag = name[2:]
        else:
            out.append(item)
            flag = None
    return out


def _bracketed(flag: str, value: str) -> str:
    value = value.strip()
    if value.startswith("[") or value in ("null", "~"):
        return value
    if value == "None":
        return "null"
    items = [part.strip() for part in value.split(",")] if value else []
    example = _LIST_EXAMPLES.get(flag, "[a,b]")
    if any(not part for part in items):
        raise ValueError(f"--{flag} {value!r} has an empty item; write e.g. --{flag} {example[1:-1]}")
    if "int" in _LIST_FIELDS[flag]:
        bad = [part for part in items if not re.fullmatch(r"[+-]?\d+", part)]
        if bad:
            raise ValueError(f"--{flag}: {bad[0]!r} is not an integer; write e.g. --{flag} {example[1:-1]}")
        return "[" + ",".join(items) + "]"
    return "[" + ",".join(json.dumps(part) for part in items) + "]"


def launch_world_size() -> int:
    """Processes of this launch: ``WORLD_SIZE`` as torchrun sets it, 1 without a launcher.

    Raises:
        ValueError: ``WORLD_SIZE`` is set to something that is not a positive integer.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    if not re.fullmatch(r"\s*\d+\s*", value) or int(value) < 1:
        raise ValueError(f"WORLD_SIZE={value!r} is not a process count; unset it or launch with torchrun")
    return int(value)


def parse_config(args: Optional[Sequence[str]] = None, config_path: Optional[str] = None) -> TrainingConfig:
    """Parse command-line flags (and an optional ``--config_path`` YAML) into a validated config.

    Raises:
        ValueError: an invalid value or combination (draccus' wrapper is removed so the message,
            which says what to change, is what the user sees).
    """
    import argparse

    import draccus
    import yaml
    from draccus.utils import DecodingError, DraccusException, ParsingError

    args = _bracket_list_flags(list(sys.argv[1:] if args is None else args))
    try:
        # exit_on_error=False: argparse raises instead of printing its whole usage block and exiting
        return draccus.parse(config_class=TrainingConfig, config_path=config_path, args=args, exit_on_error=False)
    except argparse.ArgumentError as err:  # an invalid choice ("--precision fp16"), a flag without its value
        raise ValueError(" ".join(str(err).split()) + " (--help lists every flag)") from None
    except DecodingError as err:  # a value that does not fit its field's type
        field = ".".join(err.args[0]) if err.args and isinstance(err.args[0], tuple) else ""
        cause = err.__cause__ or err
        detail = " ".join(str(cause).split())
        if "list type" in detail:
            example = _LIST_EXAMPLES.get(field, "[a,b]")
            detail += f' (write a list in brackets, e.g. --{field} "{example}", or in YAML {field}: {example})'
        if not field and "not valid for" in detail:
            detail += " (a misspelled key in the --config_path YAML?)"
        raise ValueError(f"--{field}: {detail}" if field else detail) from None
    except ParsingError as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        if isinstance(err.__cause__, yaml.YAMLError):  # the --config_path file
            path = config_path or _flag_value(args, "--config_path")
            raise ValueError(f"--config_path {path} is not valid YAML: {' '.join(str(err.__cause__).split())}") \
                from None
        raise ValueError(" ".join(str(err).split())) from None
    except yaml.YAMLError as err:  # a flag value that YAML cannot read
        raise ValueError(f"a flag value is not valid YAML: {' '.join(str(err).split())}") from None
    except DraccusException as err:  # "unrecognized arguments: --bogus 1"
        raise ValueError(" ".join(str(err).split()) + " (--help lists every flag)") from None


def _flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    for i, item in enumerate(args):
        if item == flag and i + 1 < len(args):
            return args[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None
