"""Assemble a run: precision, the mode's model surgery, ``TrainingArguments``, callbacks, the trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from molf.train.callbacks import METRICS_FILENAME, JsonMetricsCallback, RoutingLogCallback, RunLogsCutter
from molf.train.config import MOLF_MODES, RESUME_AUTO, STRATEGY_MODES
from molf.train.export import ADAPTER_DIR, FINAL_DIR, STAGING_DIR
from molf.train.routing_log import LOG_FILENAME
from molf.train.trainer import MoLFTrainer


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16_mixed`` on a bf16-capable GPU, else ``fp32``; other values unchanged."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16_mixed"
    return "fp32"


def model_dtype(precision: str) -> torch.dtype:
    """Parameter dtype: bf16 only for pure bf16 training (mixed keeps fp32 master weights)."""
    return torch.bfloat16 if resolve_precision(precision) == "bf16_pure" else torch.float32


def apply_mode(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """The mode's surgery: nothing (fft), peft LoRA (lora), MoLF experts (molf, molf_e).

    The adapters' random init is drawn from ``cfg.seed`` alone, so it does not depend on what
    consumed the global RNG before (two runs with one seed start from the same adapters).

    Returns:
        The model to train (a ``PeftModel`` in lora mode, ``model`` itself otherwise).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.mode == "lora":
            from molf.model.lora_peft import apply_lora

            return apply_lora(model, cfg)
        if cfg.mode in MOLF_MODES:
            from molf.model.wrap import wrap_model_with_molf

            wrap_model_with_molf(model, cfg)
    return model


def attach_strategy(model: torch.nn.Module, cfg: Any) -> Optional[Any]:
    """Inject a strategy mode's modules (seeded like ``apply_mode``) and return its ``StrategyRuntime``.

    Returns:
        None outside the strategy modes.

    Raises:
        ValueError: a strategy whose trainable set changes during training under DDP (DDP only
            synchronizes the parameters that were trainable when it wrapped the model).
    """
    if cfg.mode not in STRATEGY_MODES:
        return None
    from molf.model.strategies import apply_strategy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        runtime = apply_strategy(model, cfg, cfg.mode)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (len(runtime.phases) > 1 or runtime.handoff is not None):
        raise ValueError(f"{cfg.mode} with phases or a handoff changes the trainable set mid-run, which DDP "
                         "does not follow; run it in one process or with a single phase")
    return runtime


def align_strategy_with_checkpoint(runtime: Optional[Any], model: torch.nn.Module, checkpoint: Optional[str]) -> None:
    """Put the strategy in the phase of a checkpoint's step before the optimizer state is loaded."""
    if runtime is None or checkpoint is None:
        return
    from transformers import TrainerState

    step = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step
    # checkpoint-N holds the optimizer of step N - 1 (the last one taken); the callback's
    # on_step_begin(N) then changes phase exactly as the uninterrupted run did.
    runtime.on_step_begin(model, max(step - 1, 0))


def training_arguments(cfg: Any) -> TrainingArguments:
    """The Trainer's arguments from the run's config (seed and data order included)."""
    precision = resolve_precision(cfg.precision)
    if cfg.report_to == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(cfg.log_dir))
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_DIR", str(cfg.log_dir))
    return TrainingArguments(
        output_dir=str(cfg.run_dir),
        run_name=cfg.run_name,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        # The optimizer's groups carry their own lrs (FFT and LoRA kinds); the scheduler scales them all.
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warm_up_ratio,  # a value < 1 is a ratio of the total steps
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        # A NaN/inf loss is reported (DivergenceGuard), not hidden in the logged mean; the filter
        # would also cost a host sync per micro-batch.
        logging_nan_inf_filter=False,
        bf16=precision == "bf16_mixed",
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        # json is ours (JsonMetricsCallback); HF has no such integration.
        report_to=[cfg.report_to] if cfg.report_to in ("tensorboard", "wandb") else [],
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, accelerate only sets up multi-process CPU training (gloo) when told it is on CPU.
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        # Routers with top-k selection leave some parameters without gradients in a step.
        ddp_find_unused_parameters=cfg.mode in STRATEGY_MODES,
    )


def run_callbacks(cfg: Any) -> list[TrainerCallback]:
    """The routing log (MoLF modes) and the JSON metrics file (``--report_to json``), after the
    callback that cuts both back to a resumed run's checkpoint."""
    callbacks: list[TrainerCallback] = [RunLogsCutter(cfg.run_dir / LOG_FILENAME, cfg.run_dir / METRICS_FILENAME)]
    if cfg.mode in MOLF_MODES and cfg.routing_log_every > 0:
        ranks = ([None] if cfg.molf_fft else []) + [int(r) for r in cfg.molf_lora_ranks]
        callbacks.append(RoutingLogCallback(cfg.run_dir / LOG_FILENAME, ranks, cfg.molf_score_fn, cfg.molf_topk,
                                            cfg.routing_log_every))
    if cfg.report_to == "json":
        callbacks.append(JsonMetricsCallback(cfg.run_dir / METRICS_FILENAME))
    return callbacks


def build_trainer(cfg: Any, model: torch.nn.Module, tokenizer: Any, train_dataset: Any, data_collator: Any,
                  callbacks: Iterable[TrainerCallback] = (), strategy_runtime: Optional[Any] = None) -> MoLFTrainer:
    """The run's ``MoLFTrainer`` (model already through ``apply_mode``)."""
    return MoLFTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=[*run_callbacks(cfg), *callbacks],
        run_cfg=cfg,
        strategy_runtime=strategy_runtime,
    )


def resolve_resume(cfg: Any) -> Optional[str]:
    """The checkpoint to resume from: the given path, the newest in the run directory (``auto``), or None.

    Raises:
        FileNotFoundError: an explicit checkpoint path that does not exist or was not saved to the end.
    """
    value = cfg.resume_from_checkpoint
    if value is None:
        return None
    if value == RESUME_AUTO:
        return last_complete_checkpoint(cfg.run_dir)
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value} is not a directory; give a checkpoint-N "
                                f"directory or 'auto' for the newest one in the run directory")
    if not (Path(value) / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value} is not a complete Trainer checkpoint (no "
                                "trainer_state.json, which the Trainer writes last); give a checkpoint-N directory "
                                "that was saved to the end, or 'auto' for the newest such one in the run directory")
    return value


def saved_at_last_step(checkpoint: str, run_dir: Path) -> bool:
    """Whether ``checkpoint`` is one of this run directory's and was saved after the run's last
    optimizer step (its ``trainer_state.json`` has ``global_step >= max_steps``). A checkpoint from
    elsewhere may belong to a shorter run, so it is never taken as finished."""
    path = Path(checkpoint)
    if path.resolve().parent != Path(run_dir).resolve():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    max_steps = state.get("max_steps") or 0
    return max_steps > 0 and (state.get("global_step") or 0) >= max_steps


def last_complete_checkpoint(run_dir: Path) -> Optional[str]:
    """The newest ``checkpoint-N`` of ``run_dir`` that was written to the end (the Trainer writes
    ``trainer_state.json`` last, so a run killed while saving leaves one without it), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    complete = [path for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda path: int(path.name.split("-")[-1]))) if complete else None


RUN_OUTPUTS = (FINAL_DIR, STAGING_DIR, ADAPTER_DIR, LOG_FILENAME, METRICS_FILENAME)


def existing_run_outputs(run_dir: Path) -> list[str]:
    """What a run already wrote into ``run_dir``: its ``checkpoint-N`` folders, ``final`` and logs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = sorted(path.name for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    return found + [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def outputs_to_clear(cfg: Any) -> list[str]:
    """What of an earlier run in ``cfg.run_dir`` must go before this run starts (checked before any
    model is loaded): everything with ``--overwrite_run_dir``; with ``--resume_from_checkpoint auto``
    and no complete checkpoint, the leftovers of an unfinished run (logs, torn checkpoints); else nothing
    (with ``auto`` and a ``final/``, the run finished training and ``finished_earlier`` holds).

    Raises:
        ValueError: the directory holds an earlier run that this one would overwrite.
    """
    existing = existing_run_outputs(cfg.run_dir)
    if not existing or cfg.overwrite_run_dir:
        return existing
    if cfg.resume_from_checkpoint not in (None, RESUME_AUTO):
        return []
    if cfg.resume_from_checkpoint == RESUME_AUTO:
        if FINAL_DIR in existing or last_complete_checkpoint(cfg.run_dir) is not None:
            return []
        return existing
    raise ValueError(f"{cfg.run_dir} already holds this run ({', '.join(existing)}): pass --resume_from_checkpoint "
                     "auto to continue it from its last checkpoint, --only_eval True to evaluate its final model, or "
                     "--overwrite_run_dir True to start it over (deleting those)")


def finished_earlier(cfg: Any) -> bool:
    """True when ``--resume_from_checkpoint auto`` finds the run's ``final/``: its training (and merge)
    completed before, so only its evaluation is left (a resubmitted job that died while evaluating)."""
    return (cfg.resume_from_checkpoint == RESUME_AUTO and not cfg.overwrite_run_dir
            and (Path(cfg.run_dir) / FINAL_DIR).is_dir())


def clear_run_outputs(run_dir: Path, names: Iterable[str]) -> None:
    """Delete the named outputs (from ``outputs_to_clear``) of ``run_dir``; the resolved config stays."""
    import shutil

    for name in names:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
