"""Train one run: parse, build, train, merge, save, evaluate.

    python src/script/train.py --config_path configs/demo.yaml
    torchrun --nproc_per_node=N src/script/train.py --model_name_or_path Qwen/Qwen2.5-1.5B --mode molf ...
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from molf._cli import report_error
from molf.config import TrainingConfig, parse_config

IS_MAIN_RANK = int(os.environ.get("RANK", "0")) == 0
# Errors that say what to fix, found after parsing: a malformed record, a model the hub or the disk
# does not have, a phase plan past the last step, a diverged run. Printed as one line, exit 1.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def say(*args) -> None:
    if IS_MAIN_RANK:
        print(*args, flush=True)


def check_local_paths(cfg: TrainingConfig) -> None:
    """Fail before any model is loaded when a local data path is missing (or is a directory without the
    split's file), the evaluation has no data to score on or a results CSV its row cannot be appended
    to, an explicit --resume_from_checkpoint is not there, or the run directory holds an earlier run
    that this one would overwrite."""
    from molf.data.io import resolve_split_file
    from molf.model.load import check_model_paths

    check_model_paths(cfg.model_name_or_path, cfg.tokenizer_name_or_path)
    for flag in ("data_path", "eval_data_path"):
        value = getattr(cfg, flag)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{flag} {value} does not exist; pass an existing file or directory "
                                    "(or omit it to load the hub dataset)")
    if cfg.data_path is not None and not cfg.only_eval:
        resolve_split_file(Path(cfg.data_path), "train")
    if cfg.do_eval:
        from molf.data.builder import eval_source
        from molf.eval.results import check_task_file

        path, split = eval_source(cfg)
        if path is not None:
            resolve_split_file(Path(path), split)
        check_task_file(cfg.results_dir, cfg.dataset_type)  # a results CSV the row could not be appended to
    if cfg.only_eval and not (cfg.run_dir / "final").is_dir():
        raise FileNotFoundError(f"--only_eval needs a trained model at {cfg.run_dir / 'final'}; train this config "
                                "first (the run directory follows from the training flags, so pass the same ones)")
    if not cfg.only_eval:
        from molf.train.build import outputs_to_clear, resolve_resume

        resolve_resume(cfg)  # an explicit checkpoint path that is not there, or not a whole checkpoint
        if not (cfg.validate_only or cfg.preflight):
            outputs_to_clear(cfg)


def evaluate(cfg: TrainingConfig, model, tokenizer) -> None:
    """Run the task's evaluator and append its row to ``<results_dir>/<task>.csv``."""
    if not cfg.do_eval:
        return
    from molf.eval import evaluate_task

    metrics = evaluate_task(cfg.dataset_type, model.eval(), tokenizer, cfg, cfg.to_run_info())
    say(f"{cfg.dataset_type} metrics: {metrics} (row appended to {cfg.results_dir}/{cfg.dataset_type}.csv)")


def only_eval(cfg: TrainingConfig) -> None:
    from transformers import AutoTokenizer

    from molf.train.export import load_final

    final = cfg.run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"--only_eval needs a trained model at {final}; train this config first")
    evaluate(cfg, load_final(final, cfg), AutoTokenizer.from_pretrained(final))


def train(cfg: TrainingConfig) -> None:
    import torch
    from transformers import set_seed

    from molf.data import SFTCollator, build_train_dataset
    from molf.model.load import load_model, load_tokenizer
    from molf.train import build
    from molf.train.cpu_malloc import tune_cpu_malloc
    from molf.train.export import clean_checkpoints, save_final
    from molf.train.param_count import count_parameters, format_counts

    if not torch.cuda.is_available() and tune_cpu_malloc():
        say("CPU training: large freed blocks are kept for reuse (MOLF_CPU_MALLOC=0 turns this off)")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.tokenizer_name_or_path)
    model = load_model(cfg.model_name_or_path, build.model_dtype(cfg.precision), cfg.attn_implementation, cfg.seed)
    before = count_parameters(model)
    runtime = build.attach_strategy(model, cfg)
    model = build.apply_mode(model, cfg)
    say(format_counts(count_parameters(model), before))
    if runtime is not None:
        say(f"{runtime.summary()}; parameters per group: {runtime.parameter_counts()}")
    if cfg.preflight:
        return
    dataset = build_train_dataset(cfg, tokenizer, cfg.seed)
    trainer = build.build_trainer(cfg, model, tokenizer, dataset, SFTCollator(tokenizer), strategy_runtime=runtime)
    if trainer.is_world_process_zero():
        stale = build.outputs_to_clear(cfg)
        if stale:
            say(f"starting over in {cfg.run_dir}: removing {', '.join(stale)}")
            build.clear_run_outputs(cfg.run_dir, stale)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with open(cfg.run_dir / "resolved_config.yaml", "w") as handle:
            cfg.dump_yaml(handle)
    checkpoint = build.resolve_resume(cfg)
    build.align_strategy_with_checkpoint(runtime, trainer.model, checkpoint)
    if checkpoint is not None and build.saved_at_last_step(checkpoint, cfg.run_dir):
        # The Trainer would take one more step from here; a run killed while saving final/ ends here.
        say(f"{checkpoint} was saved at the last training step: loading it, no step is left to train")
        trainer._load_from_checkpoint(checkpoint)
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    if not trainer.is_world_process_zero():
        return
    final, merged = save_final(trainer.model, tokenizer, cfg, runtime)
    if cfg.clean_ckpt_at_end:
        clean_checkpoints(cfg.run_dir)
    say(f"merged checkpoint: {final}")
    for label, name in (("routing log", "molf_routing.jsonl"), ("metrics", "metrics.jsonl")):
        if (cfg.run_dir / name).exists():
            say(f"{label}: {cfg.run_dir / name}")
    evaluate(cfg, merged, tokenizer)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_progress_messages() -> None:
    """Print the package's INFO messages (strategy milestones, evaluation rows) on the main rank."""
    package = logging.getLogger("molf")
    if not any(getattr(h, "molf_stderr", False) for h in package.handlers):
        handler = _StderrHandler()
        handler.molf_stderr = True  # one such handler, however often this script is loaded
        package.addHandler(handler)
    package.setLevel(logging.INFO if IS_MAIN_RANK else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _show_progress_messages()
    try:
        cfg = parse_config(argv)
        check_local_paths(cfg)
        run_dir = cfg.run_dir  # named by the launch's process count too (a bad WORLD_SIZE is an error here)
    except (ValueError, FileNotFoundError) as err:
        return report_error(err, 2, hint=False)
    from molf.train.build import finished_earlier

    say(f"run directory: {run_dir}")
    if cfg.validate_only:
        say("config is valid")
        return 0
    try:
        if cfg.only_eval or (not cfg.preflight and finished_earlier(cfg)):
            if not cfg.only_eval:
                say(f"{cfg.run_dir / 'final'} exists: this run finished training earlier, so it is "
                    + ("evaluated only" if cfg.do_eval else "left as it is (--do_eval False)")
                    + " (--overwrite_run_dir True trains it again)")
            if IS_MAIN_RANK:  # under torchrun one process evaluates and writes the row
                only_eval(cfg)
        else:
            train(cfg)
    except USER_ERRORS as err:  # bad data, a config only the real step count rules out, a diverged run
        return report_error(err, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
