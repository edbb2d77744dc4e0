"""Run under ``torchrun --nproc_per_node=2``: trains MoLF with DDP (gloo, CPU) and dumps, per rank,
the routing decision of every step, the final weights and the number of optimizer steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from conftest import TOKENIZER_DIR, small_model  # noqa: E402
from trainrun_helpers import make_cfg, token_dataset, train  # noqa: E402

from molf.train.callbacks import unwrap_optimizer  # noqa: E402


class RecordRouting(TrainerCallback):
    def __init__(self):
        self.winners, self.scores = [], []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        decision = unwrap_optimizer(optimizer).last_routing
        self.winners.append(decision.winners.clone())
        self.scores.append(decision.scores.clone())


def main(out_dir: str) -> None:
    record = RecordRouting()
    cfg = make_cfg(Path(out_dir) / "runs", "molf", max_steps=-1, num_train_epochs=1, per_device_batch_size=2,
                   lora_dropout=0.05, lr_scheduler_type="cosine", warm_up_ratio=0.25,
                   learning_rate=1e-4, lora_learning_rate=3e-2)  # EPD scales with lr: LoRA wins some modules
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    trainer = train(cfg, small_model(), tokenizer, token_dataset(num_rows=16), callbacks=[record])
    rank = int(os.environ["RANK"])
    torch.save({"winners": record.winners, "scores": record.scores, "steps": trainer.state.global_step,
                "world": trainer.accelerator.num_processes,
                "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
