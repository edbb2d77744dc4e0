"""The MoLF expert module: one linear layer seen as an FFT expert plus one or more LoRA experts.

    y = W x + b + sum_i s_i * B_i A_i dropout(x)        s_i = alpha_i / sqrt(r_i) (rsLoRA) or alpha_i / r_i

There is no gate in the forward pass: every expert receives its exact gradient every step, and the
routing optimizer (``molf.optim.MoLFAdamW``) decides which experts apply their update.

Parameter names follow the original ``nn.Linear`` and peft's vocabulary, so a wrapped module's
state-dict keys are ``weight``, ``bias`` (when present), ``lora_A.<i>`` (shape ``(r_i, in)``) and
``lora_B.<i>`` (shape ``(out, r_i)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from molf.model.dropout import LoRADropout

FFT = "fft"
LORA = "lora"


class MoLFLinear(nn.Module):
    """A linear layer with an FFT expert (``weight``, ``bias``) and LoRA experts (``lora_A``, ``lora_B``).

    The base ``weight``/``bias`` are the original ``nn.Linear``'s parameter objects (not copies),
    so weights tied elsewhere stay tied and ``merge_and_unwrap`` can hand them back unchanged.

    Args:
        base: the ``nn.Linear`` to wrap.
        ranks: rank ``r_i`` of each LoRA expert, e.g. ``[128]`` or ``[32, 128]``.
        alphas: ``lora_alpha`` of each LoRA expert (same length as ``ranks``).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        dropout: probability of the dropout applied to the LoRA input; one mask is shared by all
            LoRA experts.
        freeze_base: MoLF-E: ``weight``/``bias`` are frozen and the module has no FFT expert.

    Raises:
        ValueError: if ``ranks`` is empty, a rank is not positive, or ``alphas`` has another length.
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        alphas: Sequence[float],
        use_rslora: bool = True,
        dropout: float = 0.0,
        freeze_base: bool = False,
    ) -> None:
        super().__init__()
        if not ranks or any(int(r) != r or r <= 0 for r in ranks):
            raise ValueError(f"MoLFLinear needs at least one positive integer rank, got {list(ranks)}")
        if len(alphas) != len(ranks):
            raise ValueError(f"give one lora_alpha per rank: {len(ranks)} ranks but {len(alphas)} alphas")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = [int(r) for r in ranks]
        self.lora_alpha = [float(a) for a in alphas]
        self.use_rslora = use_rslora
        self.scaling = [a / (math.sqrt(r) if use_rslora else r) for a, r in zip(self.lora_alpha, self.r)]
        self.freeze_base = freeze_base
        self._base_requires_grad = [p.requires_grad for p in [base.weight, base.bias] if p is not None]
        # Kept outside the module tree (no duplicate parameters); handed back by ``unwrap``.
        object.__setattr__(self, "_base_module", base)
        self.weight = base.weight
        self.bias = base.bias
        if freeze_base:
            for p in self._fft_params():
                p.requires_grad_(False)
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, self.in_features, **factory)) for r in self.r])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.empty(self.out_features, r, **factory)) for r in self.r])
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Kaiming-uniform ``lora_A`` (a = sqrt(5), as ``nn.Linear`` and peft) and zero ``lora_B``."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _fft_params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def has_fft_expert(self) -> bool:
        return not self.freeze_base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` -> ``(..., out)``.

        Each expert's ``s_i B_i (A_i x)`` is accumulated into the base output in place by one
        ``addmm_`` (scale and sum inside the GEMM), so no ``(tokens, out)`` temporaries or copies are
        made for the scaling or the sum (the base linear's backward does not need its output).
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        y = F.linear(x2, self.weight, self.bias)  # (T, out), not a view
        x_drop = self.lora_dropout(x2)  # one mask shared by all LoRA experts
        for a, b, s in zip(self.lora_A, self.lora_B, self.scaling):
            h = F.linear(x_drop.to(a.dtype), a).to(y.dtype)  # (T, r)
            y.addmm_(h, b.to(y.dtype).t(), alpha=s)  # y += s * h @ B^T
        return y.view(*lead, self.out_features)

    # ---- expert bookkeeping (the optimizer's only source of expert membership) ----

    def expert_params(self) -> list[list[nn.Parameter]]:
        """Parameters of each expert in routing order: FFT (``weight``, ``bias``) first when present,
        then ``[lora_A[i], lora_B[i]]`` per LoRA expert.
        """
        experts = [self._fft_params()] if self.has_fft_expert else []
        return experts + [[a, b] for a, b in zip(self.lora_A, self.lora_B)]

    def expert_kinds(self) -> list[str]:
        """``"fft"`` or ``"lora"`` per expert, in routing order."""
        return ([FFT] if self.has_fft_expert else []) + [LORA] * len(self.r)

    def expert_names(self) -> list[str]:
        """``fft``, ``lora0_r128``, ... per expert, in routing order."""
        return ([FFT] if self.has_fft_expert else []) + [f"lora{i}_r{r}" for i, r in enumerate(self.r)]

    # ---- merge ----

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + sum_i s_i B_i A_i`` computed in fp32 and cast back to the weight's dtype.

        Returns:
            A new tensor shaped like ``weight``.

        Raises:
            ValueError: if the merged weight has a non-finite value.
        """
        merged = self.weight.detach().float()  # (out, in)
        for a, b, s in zip(self.lora_A, self.lora_B, self.scaling):
            merged = merged + s * (b.detach().float() @ a.detach().float())  # (out, r) @ (r, in)
        if not torch.isfinite(merged).all():
            raise ValueError("merging the LoRA experts produced non-finite weights; the adapters diverged "
                             "(check the learning rates), nothing was merged")
        return merged.to(self.weight.dtype)

    @torch.no_grad()
    def unwrap(self, merged: torch.Tensor | None = None) -> nn.Module:
        """Merge the LoRA experts into ``weight`` in place and return the original linear module.

        Args:
            merged: the result of ``merged_weight()`` when the caller already computed it.

        Returns:
            The wrapped ``nn.Linear`` (same object and parameter names as before wrapping).

        Raises:
            ValueError: if the merged weight would be non-finite (the module is left unchanged).
        """
        self.weight.copy_(self.merged_weight() if merged is None else merged)
        base = self._base_module
        base.weight = self.weight
        base.bias = self.bias
        for p, flag in zip(self._fft_params(), self._base_requires_grad):
            p.requires_grad_(flag)
        return base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, use_rslora={self.use_rslora}, "
                f"freeze_base={self.freeze_base}")
