"""LoRA and DoRA: a frozen base layer plus a trained low-rank update, written as the papers write them.

LoRA (Hu et al., 2021):   h = W0 x + b + s · B A x,                     s = alpha / r  (rsLoRA: alpha / sqrt(r))
DoRA (Liu et al., 2024):  h = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_row + b

A (r, in) and B (out, r) are the only new matrices: r·(in + out) numbers instead of in·out. DoRA adds one
magnitude per output row. The base may be an ``nn.Linear`` (weight stored (out, in)), a transformers ``Conv1D``
as in GPT-2 (weight stored (in, out)) or a bitsandbytes ``Linear4bit`` (packed NF4, dequantised on demand);
``base_weight`` shows every one of them as (out, in).

One trick keeps DoRA's unmerged forward cheap, in a named helper with its identity: ``DoRALayer._row_norm``
computes the weight norm without forming W0 + s·BA.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------ base layers


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes ``Linear4bit`` (checked by name so that importing this module never needs bitsandbytes)."""
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module)


def pin_4bit_layout(layer: nn.Module) -> None:
    """Keep a bnb ``Linear4bit`` in its standard packed layout. On AVX512-BF16 CPUs bitsandbytes 0.50 repacks the
    weight in place at the first no-grad eval forward (an inference-only layout): ``dequantize_4bit`` then returns
    wrong values, evaluation stops computing what training does, and a later training forward fails."""
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit layer was already repacked by bitsandbytes for CPU bf16 inference (an eval-mode forward ran "
            "before adapters were added); load the model with load_4bit, which keeps the standard layout"
        )
    layer.support_avx512bf16_for_cpu = False


def base_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if is_conv1d(base):
        return base.nx, base.nf
    if isinstance(base, nn.Linear):  # includes Linear4bit, whose in/out_features describe the unpacked weight
        return base.in_features, base.out_features
    raise TypeError(f"unsupported base layer {type(base).__name__}; expected nn.Linear, Conv1D or bnb Linear4bit")


def base_weight(base: nn.Module) -> torch.Tensor:
    """W0 as a dense (out, in) tensor: a view for Linear/Conv1D, a fresh dequantised copy for 4-bit.

    The 4-bit copy is a temporary: callers use it and drop it, so no full-precision weight stays alive.
    """
    if is_linear4bit(base):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    return base.weight.T if is_conv1d(base) else base.weight


# ------------------------------------------------------------------------------------------ the base output


def _base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W0 x without the bias, through the base layer's own kernel (a 4-bit matmul stays 4-bit).

    ``base(x) - b`` would cost an extra pass over the output; for Linear/Conv1D one bias-free GEMM is exact.
    """
    if not is_linear4bit(base):
        x = x.to(base.weight.dtype)
        return x @ base.weight if is_conv1d(base) else F.linear(x, base.weight)  # Conv1D stores W0ᵀ
    out = base(x)
    return out - base.bias if base.bias is not None else out


# ------------------------------------------------------------------------------------------ LoRA


class LoRALayer(nn.Module):
    """``h = W0 x + b + s · B A dropout(x)`` with the base frozen and only A (r, in) and B (out, r) trained.

    A starts Kaiming-uniform and B at zero (as in the paper and peft), so a fresh adapter changes nothing.
    Adapters are kept in float32 whatever the base dtype: low-precision adapter weights lose small updates.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"cannot wrap {type(base).__name__}: expected nn.Linear, Conv1D or bnb Linear4bit")
        self.check_settings(rank, alpha, dropout)
        if is_linear4bit(base):
            pin_4bit_layout(base)
        in_features, out_features = base_features(base)
        device = base.weight.device
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @staticmethod
    def check_settings(rank: object, alpha: float, dropout: float) -> None:
        """Refuse a rank that is not a positive int (``True`` or ``2.5`` would silently become another rank), a
        non-positive alpha and a dropout outside [0, 1)."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # W0 x + b
        if self.merged:
            return result
        return result + self.lora_path(self.dropout(x)).to(result.dtype)  # + s · B A dropout(x)

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """s · B(A(x)), as two thin matmuls: (..., in) -> (..., r) -> (..., out); never the dense B A."""
        return self.scaling * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, the dense (out, in) update — only for merging, never in the forward pass."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _check_mergeable(self) -> None:
        if is_linear4bit(self.base):
            raise TypeError(
                "cannot merge into a 4-bit base layer without re-quantising it (which loses the update's precision); "
                "load the base in 16/32-bit to merge"
            )

    @torch.no_grad()
    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Write an (out, in) weight back in the base's own layout and dtype."""
        target = self.base.weight
        target.copy_((weight.T if is_conv1d(self.base) else weight).to(target.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s·BA: one matmul per layer at inference, no adapter overhead."""
        if self.merged:
            return
        self._check_mergeable()
        self._set_base_weight(base_weight(self.base).float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s·BA: back to the frozen base (to keep training, or to swap adapters)."""
        if not self.merged:
            return
        self._set_base_weight(base_weight(self.base).float() - self.delta_weight())
        self.merged = False


# ------------------------------------------------------------------------------------------ DoRA


class DoRALayer(LoRALayer):
    """``h = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_row + b``: LoRA learns the direction, ``m`` the length of each row.

    ``m`` starts at ||W0|| per output row, so a fresh adapter changes nothing. With ``detach_norm=True`` (the
    paper's §4.3 recommendation, and peft's behaviour) the norm is a constant in backward; with ``False`` its
    gradient is kept (the exact derivative of the formula above).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 detach_norm: bool = True) -> None:
        super().__init__(base, rank, alpha, dropout, rslora)
        self.detach_norm = detach_norm
        with torch.no_grad():
            w0_sq_norm = base_weight(base).float().pow(2).sum(dim=1)  # (out,) frozen: computed once
        # Derived from the frozen base, so not saved with the adapter.
        self.register_buffer("w0_sq_norm", w0_sq_norm, persistent=False)
        self.magnitude = nn.Parameter(w0_sq_norm.sqrt().clone())
        self.register_buffer("merged_norm", torch.zeros_like(w0_sq_norm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.magnitude / self.weight_norm()  # m / ||W0 + s·BA||, per output row
        if self.training and not isinstance(self.dropout, nn.Identity):
            return self._forward_with_dropout(x, scale)
        base_out = _base_linear(self.base, x)  # W0 x
        y = (base_out + self.lora_path(x).to(base_out.dtype)) * scale  # m ⊙ (W0 + s·BA) x / ||W0 + s·BA||
        bias = self.base.bias
        return (y + bias if bias is not None else y).to(base_out.dtype)

    def _forward_with_dropout(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """peft's convention with dropout: h = base(x) + (m/n - 1) ⊙ W0 drop(x) + (m/n) ⊙ s·BA drop(x).

        It equals the paper's formula when dropout keeps every input; the dropped input needs its own W0 GEMM.
        """
        result = self.base(x)
        dropped = self.dropout(x)
        update = (scale - 1) * _base_linear(self.base, dropped) + scale * self.lora_path(dropped)
        return result + update.to(result.dtype)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s·BA|| per row, in float32 even under autocast (a sum of large and small terms); a constant
        in backward when ``detach_norm``."""
        gradient_mode = torch.no_grad() if self.detach_norm else contextlib.nullcontext()
        with gradient_mode, torch.autocast(device_type=self.lora_A.device.type, enabled=False):
            return self._row_norm()

    def _row_norm(self) -> torch.Tensor:
        """||W0 + s·BA|| per output row, without forming W0 + s·BA.

        Identity: ||w_i + s b_i A||² = ||w_i||² + 2s · b_i·(A w_iᵀ) + s² · b_i (A Aᵀ) b_iᵀ, where ||w_i||² is
        cached, A w_iᵀ comes from one (r, in) pass through the base layer, and A Aᵀ is r×r.
        """
        A, B, s = self.lora_A, self.lora_B, self.scaling
        cross = _base_linear(self.base, A).T.float()  # (out, r) = W0 Aᵀ
        gram = A @ A.T  # (r, r)
        sq_norm = self.w0_sq_norm + 2 * s * (B * cross).sum(dim=1) + s * s * ((B @ gram) * B).sum(dim=1)
        return sq_norm.clamp_min(0).sqrt()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- m ⊙ (W0 + s·BA) / ||W0 + s·BA||; the norm is kept so that ``unmerge`` can invert it."""
        if self.merged:
            return
        self._check_mergeable()
        norm = self._row_norm()
        direction = base_weight(self.base).float() + self.delta_weight()
        self._set_base_weight(direction * (self.magnitude / norm)[:, None])
        self.merged_norm.copy_(norm)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        merged = base_weight(self.base).float()
        self._set_base_weight(merged * (self.merged_norm / self.magnitude)[:, None] - self.delta_weight())
        self.merged = False


ADAPTER_LAYERS: dict[str, type[LoRALayer]] = {"lora": LoRALayer, "dora": DoRALayer}
