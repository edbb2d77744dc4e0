"""The HF ``Trainer`` subclass shared by every mode: it overrides hooks only.

``create_optimizer`` builds the mode's optimizer (``molf.train.optimizers``), ``compute_loss``
counts tokens for the throughput metrics (and adds a strategy's router losses), ``log`` adds
throughput, step time, peak memory and strategy items. Data loading, DDP sampling, gradient
accumulation, clipping, scheduling and checkpointing stay the Trainer's.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback

from molf.train.callbacks import unwrap_optimizer
from molf.train.optimizers import build_optimizer
from molf.train.throughput import ThroughputMeter

logger = logging.getLogger(__name__)


class MoLFTrainer(Trainer):
    """``Trainer`` with the run's optimizer, throughput logging and the strategy hooks.

    Args:
        run_cfg: the run's ``molf.config.TrainingConfig`` (mode, lrs, wds, routing rule).
        strategy_runtime: a ``StrategyRuntime`` for the strategy modes, else None.
        *args, **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, run_cfg: Any, strategy_runtime: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_cfg = run_cfg
        self.strategy_runtime = strategy_runtime
        self.throughput = ThroughputMeter()
        # Sums of the strategy's logged values (router losses) since the last log line, and their count.
        self._strategy_sums: dict[str, torch.Tensor] = {}
        self._strategy_count = 0
        # Micro-batches with a non-finite loss since the last check (on the device: no sync per step).
        self._nonfinite_losses: Optional[torch.Tensor] = None
        self.add_callback(DivergenceGuard(self))
        self.add_callback(SaveTimeExcluder(self.throughput))
        if strategy_runtime is not None:
            self.add_callback(StrategyCallback(self))

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model if model is None else model, self.run_cfg,
                                             self.strategy_runtime)
        return self.optimizer

    def rebuild_optimizer(self) -> torch.optim.Optimizer:
        """Rebuild the optimizer over the currently trainable parameters, mid-training.

        The scheduler keeps its position and lambda: it is pointed at the new optimizer, whose
        groups get ``initial_lr`` = their configured lr and ``lr`` = ``initial_lr * lambda(step)``.
        The new optimizer is prepared by accelerate like the first one. Moments start from zero.
        """
        old, self.optimizer = self.optimizer, None
        raw = self.create_optimizer()
        if old is not None:  # let the old optimizer and its moments go: accelerate keeps a list of them
            prepared = getattr(self.accelerator, "_optimizers", None)
            if prepared is not None and old in prepared:
                prepared.remove(old)
            unwrap_optimizer(old).state.clear()
        self.optimizer = self.accelerator.prepare_optimizer(raw)
        self.callback_handler.optimizer = self.optimizer
        if self.lr_scheduler is not None:
            _repoint_scheduler(self.lr_scheduler, raw)
        return self.optimizer

    def apply_lr_multipliers(self, multipliers: dict[str, float]) -> None:
        """Scale the scheduled lr of each param group by ``multipliers[group kind]`` (default 1)."""
        scheduled = self.lr_scheduler.get_last_lr()
        for group, lr in zip(self.torch_optimizer.param_groups, scheduled):
            group["lr"] = lr * multipliers.get(group.get("kind"), 1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.throughput.started:
            self.throughput.start(self.state.global_step)
        self.throughput.update(inputs)
        if self.strategy_runtime is not None:
            self.strategy_runtime.set_token_mask(inputs.get("attention_mask"))
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.strategy_runtime is None:
            return result
        extra, items = self.strategy_runtime.extra_loss(self.accelerator.unwrap_model(model))
        if items and model.training:
            self._add_strategy_items(items)
        if extra is None:
            return result
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The LM loss is then a share of the accumulated batch's mean and is not divided by the
            # number of micro-batches later: the router loss (a per-micro-batch mean) gets the same share.
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss)).to(torch.int32)
        self._nonfinite_losses = bad if self._nonfinite_losses is None else self._nonfinite_losses + bad
        return loss

    def check_finite(self, step: int, weights: bool) -> None:
        """Raise if a loss since the last check (or, with ``weights``, a trainable weight) is not finite.

        One host sync (summed over ranks, so every rank stops together). Called at log and save steps,
        so a diverged model is never written as a checkpoint.

        Raises:
            FloatingPointError: training diverged; says what to change.
        """
        device = self.args.device
        losses = self._nonfinite_losses if self._nonfinite_losses is not None else torch.zeros((), device=device)
        self._nonfinite_losses = None
        counts = [losses.to(device=device, dtype=torch.float32)]
        if weights:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            flags = [(~torch.isfinite(p)).any().to(device=device, dtype=torch.float32) for p in trainable]
            counts.append(torch.stack(flags).sum() if flags else torch.zeros((), device=device))
        bad_losses, *bad_weights = self._sum_over_ranks(torch.stack(counts)).tolist()
        if bad_losses or any(bad_weights):
            what = (f"{int(bad_losses)} micro-batch loss(es) were NaN/inf" if bad_losses
                    else f"{int(bad_weights[0])} trainable tensor(s) hold NaN/inf")
            raise FloatingPointError(
                f"training diverged by step {step}: {what}. Lower --learning_rate / --lora_learning_rate, keep "
                "--max_grad_norm > 0, or train with --precision fp32 / bf16_mixed instead of bf16_pure; "
                f"checkpoints written before this step are kept in {self.args.output_dir}, none after it")

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            resets = getattr(self.torch_optimizer, "nonfinite_resets", 0)
            if resets:  # experts whose non-finite gradient reset their moments (MoLFAdamW)
                logs["molf_nonfinite_resets"] = resets
            logs.update(self.throughput.read(self.state.global_step, self._sum_over_ranks))
            logs.update(self._read_strategy_items())
            if self.strategy_runtime is not None:
                # global_step already counts the step just taken, whose 0-based index is one less.
                logs.update(self.strategy_runtime.log_items(max(self.state.global_step - 1, 0)))
        super().log(logs, start_time)

    def _add_strategy_items(self, items: dict[str, Any]) -> None:
        for key, value in items.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach()
            self._strategy_sums[key] = value if key not in self._strategy_sums else self._strategy_sums[key] + value
        self._strategy_count += 1

    def _read_strategy_items(self) -> dict[str, float]:
        """Means over the micro-batches since the last log line (one host sync, at logging time)."""
        if not self._strategy_count:
            return {}
        keys = list(self._strategy_sums)
        means = (torch.stack([self._strategy_sums[k] for k in keys]) / self._strategy_count).tolist()
        self._strategy_sums, self._strategy_count = {}, 0
        return dict(zip(keys, means))

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes > 1:
            return self.accelerator.reduce(tensor, reduction="sum")
        return tensor

    @property
    def torch_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer under accelerate's wrapper (None before training starts)."""
        return None if self.optimizer is None else unwrap_optimizer(self.optimizer)


class DivergenceGuard(TrainerCallback):
    """Stops training with a clear error once a loss (or, before a save and at the end of training, a
    trainable weight) is NaN/inf, and warns (once) when a logged gradient norm is exactly zero: no
    trainable parameter got any gradient, which is what a run that blew up to huge but finite weights
    looks like (saturated activations, a loss stuck near ln(vocab))."""

    def __init__(self, trainer: MoLFTrainer) -> None:
        self.trainer = trainer
        self.warned_zero_grad = False

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after the Trainer's flow callback has decided whether this step logs and saves.
        if control.should_log or control.should_save:
            self.trainer.check_finite(state.global_step, weights=control.should_save)

    def on_epoch_end(self, args, state, control, **kwargs):
        # Epoch checkpoints are decided here, not at the step's end.
        if control.should_save:
            self.trainer.check_finite(state.global_step, weights=True)

    def on_train_end(self, args, state, control, **kwargs):
        # Before the caller merges and saves the final model, whatever the save strategy.
        self.trainer.check_finite(state.global_step, weights=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        grad_norm = (logs or {}).get("grad_norm")
        if grad_norm is not None and float(grad_norm) == 0.0 and not self.warned_zero_grad:
            self.warned_zero_grad = True
            logger.warning("step %d: the gradient norm is exactly 0, so nothing is learning any more; the model "
                           "has probably saturated (a learning rate far too high makes the weights huge but "
                           "finite). Check the loss curve and lower --learning_rate / --lora_learning_rate",
                           state.global_step)


class SaveTimeExcluder(TrainerCallback):
    """Leaves the time spent writing a checkpoint at a step that does not log out of the throughput
    clock (at a logging step the log line is written first and the clock restarts after the save)."""

    def __init__(self, meter: ThroughputMeter) -> None:
        self.meter = meter

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.meter.pause()

    on_epoch_end = on_step_end  # epoch checkpoints are decided at the epoch's end

    def on_save(self, args, state, control, **kwargs):
        self.meter.resume()


class StrategyCallback(TrainerCallback):
    """Drives a ``StrategyRuntime`` at the start of every optimizer step: phase boundaries and handoff
    scales (rebuilding the optimizer when the trainable set changes), then the per-kind lr multipliers."""

    def __init__(self, trainer: MoLFTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from molf.model.strategies import validate_strategy

        # The step-range rules of phases and handoff need the real number of optimizer steps.
        for message in validate_strategy(self.trainer.run_cfg, self.trainer.run_cfg.mode, state.max_steps):
            logger.warning(message)

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        runtime = trainer.strategy_runtime
        if runtime.on_step_begin(trainer.model, state.global_step):
            trainer.rebuild_optimizer()
        trainer.apply_lr_multipliers(runtime.lr_multipliers(state.global_step))


def _repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Attach a ``LambdaLR``-style scheduler to a new optimizer, keeping ``last_epoch`` and its lambda."""
    lam = scheduler.lr_lambdas[0]
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"] * lam(scheduler.last_epoch)
    scheduler.optimizer = optimizer
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler.lr_lambdas = [lam] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
