"""Benchmark one optimizer step: MoLFAdamW vs torch AdamW (fused and foreach) over the same parameters.

For each hidden size, LoRA rank and routing regime, a 4-layer Qwen2-shaped model is wrapped with one
FFT and one LoRA expert per linear; fixed random gradients are set once and every optimizer (MoLFAdamW
fused with each score backend, MoLFAdamW foreach, AdamW fused, AdamW foreach) steps the same
parameters in one process, repetitions interleaved, after a warm-up. The gradients are restored from a
saved copy before every step, outside the timed region (the native MoLF path uses them as scratch).
One CSV row per MoLF variant. The routing
regime is forced through the learning rates (EPD is proportional to the expert's lr): ``fft`` sets
the LoRA lr 1000x below the FFT lr, ``lora`` the reverse; the measured FFT win share is reported.

    python scripts/bench_optimizer.py --device cpu --threads 2 --backends native eager compile
    python scripts/bench_optimizer.py --device cuda --backends eager triton

Writes ``results/bench_optimizer.csv`` (median ms per ``step()``, ratios, host syncs per step).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from molf.model import LoRAConfig, MoLFConfig, wrap_model_with_molf
from molf.model.tiny import build_tiny_model
from molf.optim import MoLFAdamW, OptimConfig, build_param_groups, prepass
from molf.testing import count_host_syncs

BASE_LR = 1e-4
COLUMNS = ["device", "threads", "hidden", "lora_rank", "regime", "molf_path", "score_backend", "fft_win_share",
           "num_params", "num_modules", "molf_ms", "adamw_fused_ms", "adamw_foreach_ms", "ratio_vs_fused",
           "ratio_vs_foreach", "molf_host_syncs_per_step", "reps"]


@dataclass
class WrapConfig(MoLFConfig, LoRAConfig):
    pass


def build_model(hidden: int, rank: int, vocab: int, device: torch.device) -> torch.nn.Module:
    """A 4-layer Qwen2-shaped model (MLP ratio 5.5, 2 KV heads, head_dim 64) wrapped with one LoRA expert."""
    model = build_tiny_model("qwen2", hidden_size=hidden, intermediate_size=int(hidden * 5.5), num_hidden_layers=4,
                             num_attention_heads=hidden // 64, num_key_value_heads=2, vocab_size=vocab)
    wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[rank], lora_dropout=0.0))
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    return model


def make_optimizers(model: torch.nn.Module, regime: str, backends: list[str]) -> dict[str, torch.optim.Optimizer]:
    """``molf_fused_<backend>`` for each backend, ``molf_foreach``, ``adamw_fused``, ``adamw_foreach``."""
    fft_lr, lora_lr = (BASE_LR, BASE_LR * 1e-3) if regime == "fft" else (BASE_LR * 1e-3, BASE_LR)
    cfg = OptimConfig(learning_rate=fft_lr, lora_learning_rate=lora_lr, weight_decay=0.01, lora_weight_decay=0.01)
    optimizers: dict[str, torch.optim.Optimizer] = {
        f"molf_fused_{b}": MoLFAdamW.from_config(model, cfg, fused=True, score_backend=b) for b in backends}
    optimizers["molf_foreach"] = MoLFAdamW.from_config(model, cfg, fused=False)
    optimizers["adamw_fused"] = torch.optim.AdamW(build_param_groups(model, cfg), fused=True)
    optimizers["adamw_foreach"] = torch.optim.AdamW(build_param_groups(model, cfg), foreach=True)
    return optimizers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def restore_grads(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    torch._foreach_copy_([p.grad for p in model.parameters()], grads)


def time_steps(optimizers: dict, model: torch.nn.Module, grads: list[torch.Tensor], device: torch.device,
               warmup: int, reps: int) -> dict[str, float]:
    """Median ms per ``step()`` of each optimizer, repetitions interleaved across optimizers; ``grads``
    (the saved gradients) are restored before every step."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for rep in range(warmup + reps):
        for name, optimizer in optimizers.items():
            restore_grads(model, grads)
            _sync(device)
            start = time.perf_counter()
            optimizer.step()
            _sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_rows(hidden: int, rank: int, regime: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per MoLF variant of this configuration, all timed in the same interleaved loop."""
    model = build_model(hidden, rank, args.vocab, device)
    optimizers = make_optimizers(model, regime, args.backends)
    molfs = {name: o for name, o in optimizers.items() if name.startswith("molf")}
    syncs = {}
    grads = [p.grad.clone() for p in model.parameters()]
    for name, molf in molfs.items():
        restore_grads(model, grads)
        molf.step()  # first step: state allocation (and compilation) happen outside the count
        restore_grads(model, grads)
        with count_host_syncs() as counter:
            molf.step()
        syncs[name] = counter.count
    ms = time_steps(optimizers, model, grads, device, args.warmup, args.reps)
    rows = []
    for name, molf in molfs.items():
        winners = molf.last_routing.winners
        rows.append(dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            threads=torch.get_num_threads(), hidden=hidden, lora_rank=rank, regime=regime,
            molf_path="fused" if molf.fused else "foreach",
            score_backend=prepass.resolve_backend(molf.score_backend, device) if molf.fused else "-",
            fft_win_share=round(winners[:, 0].float().mean().item(), 3),
            num_params=sum(p.numel() for p in model.parameters()), num_modules=len(molf.module_names),
            molf_ms=round(ms[name], 3), adamw_fused_ms=round(ms["adamw_fused"], 3),
            adamw_foreach_ms=round(ms["adamw_foreach"], 3), ratio_vs_fused=round(ms[name] / ms["adamw_fused"], 3),
            ratio_vs_foreach=round(ms[name] / ms["adamw_foreach"], 3), molf_host_syncs_per_step=syncs[name],
            reps=args.reps))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--regimes", nargs="+", default=["fft", "lora"], choices=["fft", "lora"])
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (small so the experts dominate)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=list(prepass.BACKENDS),
                        help="score backends of the fused MoLF rows (auto = native on CPU, eager on CUDA)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_optimizer.csv"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: CUDA is not available on this machine; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for hidden in args.hidden:
            for rank in args.ranks:
                for regime in args.regimes:
                    for row in bench_rows(hidden, rank, regime, args, device):
                        writer.writerow(row)
                        print(", ".join(f"{k}={row[k]}" for k in COLUMNS[2:]), flush=True)
                    handle.flush()


if __name__ == "__main__":
    main()
