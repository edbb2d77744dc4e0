"""The native CPU path of ``MoLFAdamW``: two C kernels (``csrc/molf_cpu.c``) called through ctypes.

Per bucket of fp32 expert tensors on the CPU, one step is two passes over memory:

1. ``moments_scores``: for every tensor, the AdamW moment update in place, the per-tensor sum of the
   routing score term, and the AdamW increment ``x = -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``
   written over the gradient (the gradient is not needed after the moments; it is scratch);
2. ``apply``: for the winners only, ``p = p * (1 - lr wd) + x``. Losers need nothing more.

That reads five arrays per element (``g, m, v``, then ``p, x`` for winners) where the score pre-pass
plus torch's fused AdamW reads seven, and it is bit-identical to ``torch.optim.AdamW(fused=True)``
when every expert wins (on the x86-64 Linux wheels, AVX512 and AVX2 kernels; see the C file).

The kernels are compiled on first use with the system C compiler (``$CC``, else ``cc``), with
``-O3 -march=native`` and OpenMP when the compiler has it, into a cache directory keyed by the
source, the flags, the compiler and the CPU (``$MOLF_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/molf/native`` or ``~/.cache/molf/native``). Where no compiler works, ``available()``
is False and ``MoLFAdamW``'s ``auto`` backend uses the ``eager`` pre-pass instead. ``MOLF_NATIVE=0``
disables the native path.

The same library holds the CPU dropout of the LoRA inputs (``dropout`` below, used by
``molf.model.dropout``): a counter-based mask that the backward pass regenerates from a key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "molf_cpu.c"
BLOCK = 1 << 16  # elements per parallel work item (a multiple of every vector width)
SCORE_KINDS = {"ratio_times_m": 0, "ratio_squared": 1}  # ScoreFn.native_term -> the C enum
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_P = ctypes.c_void_p
_I64, _F64, _INT, _U32 = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_uint32


class NativeUnavailable(RuntimeError):
    """The native kernels could not be built or loaded; the message says why."""


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def cache_dir() -> Path:
    if os.environ.get("MOLF_NATIVE_CACHE"):
        return Path(os.environ["MOLF_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molf" / "native"


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise NativeUnavailable(f"no C compiler {cc!r} on PATH (set CC, or use --molf_score_backend eager)")
    return cc


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile to ``out`` atomically; returns the compiler's error text, or None on success."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *_BASE_FLAGS, *flags, str(SOURCE), "-o", tmp, "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return result.stderr.strip() or f"exit {result.returncode}"
        os.replace(tmp, out)  # atomic: concurrent ranks may build at once
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL:
    """Build (once per machine and source) and load the kernels; a failure is remembered too, so a
    machine without a working compiler tries once per process, not once per step.

    Raises:
        NativeUnavailable: disabled by ``MOLF_NATIVE=0``, no compiler, or no flag set compiles.
    """
    lib, error = _load_once()
    if lib is None:
        raise NativeUnavailable(error)
    return lib


@functools.lru_cache(maxsize=None)
def _load_once() -> tuple[ctypes.CDLL | None, str]:
    try:
        return _build_and_load(), ""
    except NativeUnavailable as err:
        return None, str(err)


def _build_or_open(cc: str, flags: list[str], path: Path) -> tuple[ctypes.CDLL | None, str]:
    """The library at ``path``, built first when missing or when the cached file does not load
    (truncated by a killed build); ``(None, why)`` when it cannot be had with these flags."""
    if path.exists():
        try:
            return ctypes.CDLL(str(path)), ""
        except OSError:
            pass
    error = _build(cc, flags, path)
    if error is not None:
        return None, error
    try:
        return ctypes.CDLL(str(path)), ""
    except OSError as err:
        return None, f"{err} (is {path.parent} on a noexec mount? set MOLF_NATIVE_CACHE)"


def _build_and_load() -> ctypes.CDLL:
    if os.environ.get("MOLF_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by MOLF_NATIVE=0")
    cc = _compiler()
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(_BASE_FLAGS + flags).encode(), cc.encode(),
                                         version.encode(), _cpu_fingerprint().encode()])).hexdigest()[:16]
        path = cache_dir() / f"molf_cpu_{key}.so"
        lib, error = _build_or_open(cc, flags, path)
        if lib is None:
            errors.append(f"{' '.join(flags) or '(no extra flags)'}: {error.splitlines()[-1]}")
            continue
        lib.molf_moments_scores.argtypes = [_P, _P, _P, _P, _P, _P, _F64, _F64, _F64, _F64, _INT, _P, _P, _I64,
                                            _I64, _P, _I64, _P, _I64, _I64, _INT]
        lib.molf_moments_scores.restype = None
        lib.molf_apply.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _INT]
        lib.molf_apply.restype = None
        lib.molf_dropout.argtypes = [_P, _P, _I64, _U32, _U32, _U32, ctypes.c_float, _I64, _INT]
        lib.molf_dropout.restype = None
        return lib
    raise NativeUnavailable(f"could not compile {SOURCE.name} with {cc}: " + "; ".join(errors))


def available() -> bool:
    """Whether the native kernels can be used on this machine (builds them on the first call)."""
    return _load_once()[0] is not None


def unavailable_reason() -> str:
    """Why the kernels cannot be used ("" when they can)."""
    return _load_once()[1]


@functools.lru_cache(maxsize=None)
def tail_widths() -> tuple[int, int]:
    """How torch's fused CPU AdamW splits a tensor: its vector body covers ``numel - numel % w``
    elements and its compiled tail loop takes ``e`` more with vector code when that many are left;
    returns ``(w, e)``. Measured on the x86-64 Linux wheels with torch's AVX512 and AVX2 kernels (the
    AVX2 build has no vector epilogue); a guess elsewhere (where the native path then agrees with
    fused AdamW to rounding, not bit for bit)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": (16, 8), "AVX2": (8, 0)}.get(capability, (4, 4))


def supports(params: list[Tensor]) -> bool:
    """Whether the kernels handle these tensors: fp32, contiguous, on the CPU."""
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params)


@dataclass
class NativePlan:
    """The work items of one bucket: ``(block_tensor, block_start)`` per block of at most ``BLOCK``."""

    numels: np.ndarray  # (P,) int64
    block_tensor: np.ndarray  # (B,) int64
    block_start: np.ndarray  # (B,) int64
    block_sums: np.ndarray  # (B,) float64 scratch
    tensor_sums: np.ndarray  # (P,) float64 output


def plan(numels: list[int], block: int = BLOCK) -> NativePlan:
    counts = [max(1, -(-n // block)) for n in numels]
    block_tensor = np.repeat(np.arange(len(numels), dtype=np.int64), counts)
    block_start = np.concatenate([np.arange(c, dtype=np.int64) * block for c in counts]) if counts else \
        np.zeros(0, dtype=np.int64)
    return NativePlan(np.asarray(numels, dtype=np.int64), block_tensor, block_start,
                      np.zeros(len(block_tensor)), np.zeros(len(numels)))


def _pointers(tensors: list[Tensor]):
    return (_P * len(tensors))(*[t.data_ptr() for t in tensors])


def _addr(array: np.ndarray) -> int:
    return array.ctypes.data


def moments_scores(p: NativePlan, grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   steps: np.ndarray, lr: float, beta1: float, beta2: float, eps: float, score_eps: float,
                   score_term: str) -> Tensor:
    """Pass 1 over a bucket; ``steps`` are the tensors' step counts *after* this step's increment.

    Updates ``exp_avgs``/``exp_avg_sqs`` in place, overwrites ``grads`` with the AdamW increments and
    returns the ``(P,)`` fp32 score sums.
    """
    steps = np.asarray(steps, dtype=np.float64)
    neg_step_sizes = -(lr / (1.0 - np.power(beta1, steps)))
    bc2_sqrts = np.sqrt(1.0 - np.power(beta2, steps))
    load().molf_moments_scores(
        _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), _addr(p.numels), _addr(neg_step_sizes),
        _addr(bc2_sqrts), beta1, beta2, eps, score_eps, SCORE_KINDS[score_term], _addr(p.block_tensor),
        _addr(p.block_start), len(p.block_tensor), BLOCK, _addr(p.block_sums), len(p.numels),
        _addr(p.tensor_sums), *tail_widths(), torch.get_num_threads())
    return torch.from_numpy(p.tensor_sums.astype(np.float32))


def apply(p: NativePlan, params: list[Tensor], increments: list[Tensor], winners: np.ndarray, lr: float,
          weight_decay: float) -> None:
    """Pass 2: ``param = param * (1 - lr wd) + increment`` for the tensors where ``winners`` is True."""
    if not winners.any():
        return
    blocks = winners[p.block_tensor]
    block_tensor, block_start = p.block_tensor[blocks], p.block_start[blocks]
    decay = np.float32(1.0 - lr * weight_decay) if weight_decay != 0 else np.float32(1.0)
    decays = np.full(len(p.numels), decay, dtype=np.float32)
    load().molf_apply(_pointers(params), _pointers(increments), _addr(p.numels), _addr(decays),
                      _addr(block_tensor), _addr(block_start), len(block_tensor), BLOCK, torch.get_num_threads())


def dropout_threshold(p: float) -> int:
    """The 32-bit hash threshold under which an element is dropped: ``round(p * 2^32)``."""
    return min(int(round(p * 2**32)), 2**32 - 1)


def dropout(x: Tensor, key: tuple[int, int], p: float) -> Tensor:
    """``x * keep / (1 - p)`` for a contiguous fp32 CPU ``x``, where ``keep`` is a function of ``key``
    and the element index only (so calling it again with the same key gives the same mask, on any
    number of threads). Returns a new tensor shaped like ``x``."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    load().molf_dropout(x.data_ptr(), out.data_ptr(), x.numel(), key[0], key[1], dropout_threshold(p),
                        1.0 / (1.0 - p), BLOCK, torch.get_num_threads())
    return out
