"""Training-step throughput and memory of fft, lora, molf and molf_e on one model, in one process.

    python scripts/bench_train.py                       # CPU, writes results/bench_train.csv
    python scripts/bench_train.py --device cuda --batch_size 8 --precision bf16_mixed
    python scripts/bench_train.py --hidden_size 1536 --intermediate_size 8960 --num_attention_heads 12 \
        --num_key_value_heads 2 --num_layers 6 --out results/bench_train_qwen1.5b_shape.csv   # real shapes

Every mode gets the same randomly initialised Qwen2-style model (hidden 512, 4 layers by default),
the same random token batch (seq 256, vocab 32000) and the same step as the trainer: forward, backward,
grad-norm clipping, the mode's optimizer (``molf.train.optimizers.build_optimizer``), zero_grad; on the
CPU with the trainer's malloc tuning (``molf.train.cpu_malloc``; ``--no_cpu_malloc_tuning`` keeps
glibc's defaults). Modes are interleaved within each repetition so machine noise hits them alike; the
CSV holds medians and the step-time ratio of each mode to fft measured in the same process.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

from molf.config import TrainingConfig
from molf.model.tiny import build_tiny_model
from molf.train.build import apply_mode
from molf.train.cpu_malloc import tune_cpu_malloc
from molf.train.optimizers import build_optimizer

MODES = {
    "fft": {},
    "lora": {"lora_rank": 32},
    "molf": {"molf_lora_ranks": [128]},
    "molf_e": {"molf_lora_ranks": [32, 128]},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16_mixed", "bf16_pure"], default="fp32")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=0, help="MLP width (0: 2.6875 x hidden)")
    parser.add_argument("--num_attention_heads", type=int, default=0, help="0: hidden / 64")
    parser.add_argument("--num_key_value_heads", type=int, default=0, help="0: as many as attention heads")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per repetition")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the first repetition")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="results/bench_train.csv")
    parser.add_argument("--no_cpu_malloc_tuning", action="store_true",
                        help="on CPU, keep glibc's default malloc instead of the trainer's tuning "
                             "(molf.train.cpu_malloc), to measure what the tuning changes")
    return parser.parse_args()


def build_mode(mode: str, args: argparse.Namespace):
    """The model (same init for every mode) after the mode's surgery, and its optimizer."""
    dtype = torch.bfloat16 if args.precision == "bf16_pure" else torch.float32
    heads = args.num_attention_heads or max(args.hidden_size // 64, 1)
    model = build_tiny_model("qwen2", seed=0, dtype=dtype, hidden_size=args.hidden_size,
                             intermediate_size=args.intermediate_size or int(args.hidden_size * 2.6875),
                             num_hidden_layers=args.num_layers, num_attention_heads=heads,
                             num_key_value_heads=args.num_key_value_heads or heads, vocab_size=args.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TrainingConfig(model_name_or_path="tiny-qwen2", mode=mode, learning_rate=1e-4,
                             lora_learning_rate=1e-4, weight_decay=0.01, lora_weight_decay=0.01, **MODES[mode])
    model = apply_mode(model, cfg).to(args.device)
    model.config.use_cache = False
    model.train()
    return model, build_optimizer(model, cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch: torch.Tensor, autocast, device: torch.device) -> tuple[float, float]:
    """One step; returns (forward+backward+clip seconds, optimizer step + zero_grad seconds)."""
    _sync(device)
    start = time.perf_counter()
    with autocast():
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    _sync(device)
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return middle - start, time.perf_counter() - middle


def timed_steps(model, optimizer, batch, autocast, steps: int, device: torch.device):
    """(step seconds, optimizer seconds) per step and the block's peak CUDA memory (MiB, nan on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [train_step(model, optimizer, batch, autocast, device) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return [a + b for a, b in times], [b for _, b in times], peak


def adapter_modules(model) -> list[tuple[int, int, list[int]]]:
    """``(in, out, ranks)`` of every linear that carries LoRA experts (MoLF) or adapters (peft)."""
    from molf.model.molf_linear import MoLFLinear

    found = []
    for module in model.modules():
        if isinstance(module, MoLFLinear):
            found.append((module.in_features, module.out_features, list(module.r)))
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # peft LoRA layer
            linear = module.base_layer
            found.append((linear.in_features, linear.out_features, [a.out_features for a in module.lora_A.values()]))
    return found


def adapter_flops_pct(model) -> float:
    """LoRA matmul work as a % of the base linears' (head excluded): sum r (in + out) / sum in * out."""
    modules = adapter_modules(model)
    base = sum(n_in * n_out for n_in, n_out, _ in modules)
    adapter = sum(sum(ranks) * (n_in + n_out) for n_in, n_out, ranks in modules)
    return 100.0 * adapter / base if base else 0.0


def adapter_gemm_seconds(model, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Seconds per step of the adapters' six GEMMs alone (forward ``x A^T``, ``h B^T``; backward
    ``g B``, ``h^T g``, ``g_h A``, ``g_h^T x``), timed in isolation on random data, summed over the
    model's adapters: the floor a LoRA-carrying mode pays over fft whatever the rest of the step costs."""
    total = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = Counter((n_in, n_out, r) for n_in, n_out, ranks in adapter_modules(model) for r in ranks)
    for (n_in, n_out, r), count in shapes.items():
        x, g = (torch.randn(tokens, n, generator=gen, device=device, dtype=dtype) for n in (n_in, n_out))
        a = torch.randn(r, n_in, generator=gen, device=device, dtype=dtype)
        b = torch.randn(n_out, r, generator=gen, device=device, dtype=dtype)
        h, g_h = x @ a.t(), g @ b

        def gemms():
            return x @ a.t(), h @ b.t(), g @ b, h.t() @ g, g_h @ a, g_h.t() @ x

        gemms()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            gemms()
            _sync(device)
            times.append(time.perf_counter() - start)
        total += count * statistics.median(times)
    return total


def state_mib(model, optimizer) -> float:
    """Parameters + optimizer state, in MiB (exact tensor bytes; what the method keeps between steps)."""
    tensors = {id(p): p for p in model.parameters()}
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    args.cpu_malloc_tuned = device.type == "cpu" and not args.no_cpu_malloc_tuning and tune_cpu_malloc()
    modes = args.modes.split(",")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16_mixed" \
        else nullcontext
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)
    built = {mode: build_mode(mode, args) for mode in modes}
    for model, optimizer in built.values():
        for _ in range(args.warmup):
            train_step(model, optimizer, batch, autocast, device)
    times = {mode: [] for mode in modes}
    optim_times = {mode: [] for mode in modes}
    peaks = {mode: [] for mode in modes}
    for _ in range(args.repetitions):
        for mode in modes:  # interleaved: each repetition visits every mode once
            step_times, optimizer_times, peak = timed_steps(*built[mode], batch, autocast, args.steps, device)
            times[mode] += step_times
            optim_times[mode] += optimizer_times
            peaks[mode].append(peak)
    return summarize(args, built, times, optim_times, peaks)


def summarize(args, built, times, optim_times, peaks) -> list[dict]:
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    tokens = args.batch_size * args.seq_len
    gemm_dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16  # the matmuls' compute dtype
    rows = []
    for mode, (model, optimizer) in built.items():
        rows.append({
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "precision": args.precision, "cpu_malloc_tuned": args.cpu_malloc_tuned, "mode": mode,
            "batch_size": args.batch_size, "seq_len": args.seq_len,
            "hidden_size": args.hidden_size, "num_layers": args.num_layers, "vocab_size": args.vocab_size,
            "intermediate_size": args.intermediate_size or int(args.hidden_size * 2.6875),
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "median_step_time_s": round(medians[mode], 5),
            "tokens_per_second": round(tokens / medians[mode], 1),
            "step_time_ratio_vs_fft": round(medians[mode] / medians["fft"], 4) if "fft" in medians else "",
            "median_optimizer_time_s": round(statistics.median(optim_times[mode]), 5),
            "adapter_matmul_pct_of_base": round(adapter_flops_pct(model), 1),
            "adapter_gemm_s": round(adapter_gemm_seconds(model, tokens, torch.device(args.device), gemm_dtype), 5),
            "peak_memory_mib": round(max(peaks[mode]), 1) if args.device.startswith("cuda") else "",
            "param_and_optimizer_state_mib": round(state_mib(model, optimizer), 1),
            "timed_steps": len(times[mode]),
        })
    return rows


def main() -> None:
    args = parse_args()
    rows = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['mode']:>7}: {row['median_step_time_s']:.4f} s/step, {row['tokens_per_second']:.0f} tok/s, "
              f"x{row['step_time_ratio_vs_fft']} of fft, adapter GEMMs alone {row['adapter_gemm_s']:.4f} s, "
              f"state {row['param_and_optimizer_state_mib']} MiB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
