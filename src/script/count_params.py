"""Parameter counts of a model under a mode: base weight, base bias, LoRA experts, other; total and trainable.

    python src/script/count_params.py --model_name_or_path tiny-qwen2 --mode molf --molf_lora_ranks "[128]"

Takes the training flags (or ``--config_path``); loads the model, applies the mode and prints the
table and what the mode adds. Nothing is trained or written.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from molf._cli import report_error, run_cli
from molf.config import parse_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    from molf.model.load import check_model_paths, load_model
    from molf.train.build import apply_mode, attach_strategy, model_dtype
    from molf.train.param_count import count_parameters, format_counts

    try:
        cfg = parse_config(argv)
        check_model_paths(cfg.model_name_or_path, cfg.tokenizer_name_or_path)
    except (ValueError, FileNotFoundError) as err:
        return report_error(err, 2, hint=False)
    try:
        model = load_model(cfg.model_name_or_path, model_dtype(cfg.precision), cfg.attn_implementation, cfg.seed)
        before = count_parameters(model)
        runtime = attach_strategy(model, cfg)
        model = apply_mode(model, cfg)
    except (ValueError, OSError) as err:  # no network for a hub id; target modules the model does not have
        return report_error(err, 1)
    print(f"{cfg.model_name_or_path}, mode {cfg.mode}")
    print(format_counts(count_parameters(model), before))
    if runtime is not None:
        print(f"{runtime.summary()}; parameters per group: {runtime.parameter_counts()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
