"""Train one run: parse, build, train, merge, save, evaluate.

    python src/script/train.py --config_path configs/demo.yaml
    torchrun --nproc_per_node=N src/script/train.py --model_name_or_path Qwen/Qwen2.5-1.5B --mode molf ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from molf.config import TrainingConfig, parse_config


def evaluate(cfg: TrainingConfig, model, tokenizer) -> Optional[dict]:
    """Run the task's evaluator (rank 0) and append its row to the results CSV."""
    if not cfg.do_eval:
        return None
    from molf.eval import evaluate_task

    model.eval()
    return evaluate_task(cfg.dataset_type, model, tokenizer, cfg, cfg.to_run_info())


def only_eval(cfg: TrainingConfig) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = cfg.run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"--only_eval needs a trained model at {final}; train this config first")
    print(evaluate(cfg, AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)))


def train(cfg: TrainingConfig) -> None:
    from transformers import set_seed

    from molf.data import SFTCollator, build_train_dataset
    from molf.model.load import load_model, load_tokenizer
    from molf.train.build import apply_mode, build_trainer, model_dtype, resolve_resume
    from molf.train.export import clean_checkpoints, save_final
    from molf.train.param_count import count_parameters, format_counts

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.tokenizer_name_or_path)
    model = load_model(cfg.model_name_or_path, model_dtype(cfg.precision), cfg.attn_implementation, cfg.seed)
    before = count_parameters(model)
    model = apply_mode(model, cfg)
    print(format_counts(count_parameters(model), before))
    if cfg.preflight:
        return
    trainer = build_trainer(cfg, model, tokenizer, build_train_dataset(cfg, tokenizer, cfg.seed), SFTCollator(tokenizer))
    if trainer.is_world_process_zero():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with open(cfg.run_dir / "resolved_config.yaml", "w") as handle:
            cfg.dump_yaml(handle)
    trainer.train(resume_from_checkpoint=resolve_resume(cfg))
    if not trainer.is_world_process_zero():
        return
    final = save_final(trainer.model, tokenizer, cfg)
    if cfg.clean_ckpt_at_end:
        clean_checkpoints(cfg.run_dir)
    print(f"merged checkpoint: {final}")
    for name in ("molf_routing.jsonl", "metrics.jsonl"):
        if (cfg.run_dir / name).exists():
            print(f"{name.split('.')[0].replace('_', ' ')}: {cfg.run_dir / name}")
    from transformers import AutoModelForCausalLM

    metrics = evaluate(cfg, AutoModelForCausalLM.from_pretrained(final), tokenizer)
    if metrics is not None:
        print(f"{cfg.dataset_type} metrics: {metrics} (row appended to {Path(cfg.results_dir) / cfg.dataset_type}.csv)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {cfg.run_dir}")
    if cfg.validate_only:
        print("config is valid")
    elif cfg.only_eval:
        only_eval(cfg)
    else:
        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
