"""Hand-written LoRA and DoRA layers around a frozen base layer.

The base may be an ``nn.Linear`` (weight stored (out, in)), a transformers ``Conv1D`` as in GPT-2 (weight stored
(in, out)) or a bitsandbytes ``Linear4bit`` (NF4/FP4, packed; dequantised on demand). Internally every weight is
seen in one layout, (out, in); ``base_weight`` converts at the boundary.

LoRA (Hu et al., 2021):   y = base(x) + s · B A dropout(x),            s = alpha / r   (rsLoRA: alpha / sqrt(r))
DoRA (Liu et al., 2024):  y = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_row + b

The unmerged forward never forms W0 + BA: LoRA runs two thin matmuls, and DoRA's per-output-row norm is
assembled from cached ||W0||², a rank-r cross term and an r×r Gram matrix (see ``_row_norm``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes ``Linear4bit`` (checked by name so that importing this module never needs bitsandbytes)."""
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def pin_4bit_layout(base: nn.Module) -> None:
    """Keep a bnb ``Linear4bit`` in its standard packed layout, with a differentiable forward in its compute dtype.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks the weight *in place* at the first eval-mode forward without
    gradients (an inference-only layout: nested absmax expanded to bf16, bf16 matmul). Afterwards
    ``dequantize_4bit`` returns wrong values, evaluation no longer computes what training does, and a later
    training forward fails. Turning that switch off keeps training, evaluation and DoRA's norm on the same weights.
    """
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this 4-bit layer was already repacked by bitsandbytes for CPU bf16 inference (an eval-mode forward ran "
            "before adapters were added); load it with peft_utils.quant.load_quantized, which keeps the standard layout"
        )
    base.support_avx512bf16_for_cpu = False


def is_quantized(tensor: torch.Tensor) -> bool:
    """A bitsandbytes packed 4-bit weight: its storage is not its shape (see ``logical_numel``)."""
    return getattr(tensor, "quant_state", None) is not None


def logical_numel(tensor: torch.Tensor) -> int:
    """Element count of the weight a tensor encodes: a packed 4-bit weight counts as the matrix it stands for."""
    return int(torch.Size(tensor.quant_state.shape).numel()) if is_quantized(tensor) else tensor.numel()


def check_rank(rank: object) -> int:
    """The adapter rank: a positive int (``True`` or ``2.5`` would silently become another rank)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_linear4bit(module)


def base_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if is_conv1d(base):
        return base.nx, base.nf
    if isinstance(base, nn.Linear):  # includes Linear4bit, whose in/out_features describe the unpacked weight
        return base.in_features, base.out_features
    raise TypeError(f"unsupported base layer {type(base).__name__}; expected nn.Linear, Conv1D or bnb Linear4bit")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor: a view for Linear/Conv1D, a fresh dequantised copy for 4-bit.

    The 4-bit copy is a temporary: callers use it and drop it, so no full-precision weight stays alive.
    """
    if is_linear4bit(base):
        import bitsandbytes.functional as bnbf

        pin_4bit_layout(base)  # a CPU-repacked weight would dequantise to wrong values
        return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    if is_conv1d(base):
        return base.weight.T
    return base.weight


def _base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W0 x without the bias, through the base layer's own kernel (the 4-bit matmul stays 4-bit)."""
    if not is_linear4bit(base):
        x = x.to(base.weight.dtype)
        # One GEMM and no bias, rather than base(x) - b (an extra pass): Conv1D stores W0ᵀ (in, out).
        return x @ base.weight if is_conv1d(base) else F.linear(x, base.weight)
    out = base(x)
    return out - base.bias if base.bias is not None else out


def _plus_low_rank(out: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling · down upᵀ`` for down (..., r) and up (out, r), as one GEMM accumulating into ``out``.

    addmm computes C + α·(A @ B): the scaling rides on α and the sum on the accumulator, so no full-size
    (..., out) temporary is made for the update or its scaled copy (nor for their gradients).
    """
    if out.dtype != down.dtype and not torch.is_autocast_enabled(out.device.type):
        return out + (F.linear(down, up) * scaling).to(out.dtype)  # e.g. a bf16 base without autocast
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), down.reshape(-1, down.shape[-1]), up.T, alpha=scaling)
    return fused.view(*out.shape[:-1], fused.shape[-1])


class LoRALayer(nn.Module):
    """``y = base(x) + s · B A dropout(x)`` with the base frozen and only A (r, in) and B (out, r) trained.

    A starts Kaiming-uniform and B at zero (as in the paper and peft), so a fresh adapter changes nothing.
    Adapters are kept in float32 whatever the base dtype: low-precision adapter weights lose small updates.
    """

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"cannot wrap {type(base).__name__}: expected nn.Linear, Conv1D or bnb Linear4bit")
        check_rank(rank)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if is_linear4bit(base):
            pin_4bit_layout(base)
        in_features, out_features = base_features(base)
        device = base.weight.device
        self.base = base
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for parameter in base.parameters():
            parameter.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x, as two thin matmuls: (..., in) -> (..., r) -> (..., out)."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s · B A, the dense (out, in) update — only for merging, never in the forward pass."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out), bias included
        if self.merged:
            return result
        # y = base(x) + s · B (A dropout(x))
        down = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return _plus_low_rank(result, down, self.lora_B, self.scaling)

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
        """Fold the update into the base weight: one matmul per layer at inference, no adapter overhead."""
        if self.merged:
            return
        self._check_mergeable()
        weight = base_weight(self.base)
        self._set_base_weight(weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = base_weight(self.base)
        self._set_base_weight(weight.float() - self.delta_weight())
        self.merged = False


class DoRALayer(LoRALayer):
    """``y = m ⊙ (W0 + s·BA) x / ||W0 + s·BA||_row + b``: LoRA for the direction, a trained magnitude per output.

    ``m`` starts at ||W0|| per output row, so a fresh adapter changes nothing. With ``detach_norm=True`` (the
    paper's §4.3 recommendation, and peft's behaviour) the norm is a constant in backward; with ``False`` its
    gradient is kept (the exact derivative of the formula above).

    With dropout, as in peft: y = base(x) + (m/n - 1) ⊙ W0 drop(x) + (m/n) ⊙ s·BA drop(x), which equals the
    formula above when dropout is off (or in eval mode); then the formula itself runs, with one base GEMM (W0 x,
    no bias) and the low-rank term accumulated into it, so a single (..., out) tensor is kept for backward.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora)
        self.detach_norm = detach_norm
        with torch.no_grad():
            w0_sq_norm = base_weight(base).float().pow(2).sum(dim=1)  # (out,) frozen: computed once
        # Derived from the frozen base, so not saved with the adapter; refreshed if the base is replaced.
        self.register_buffer("w0_sq_norm", w0_sq_norm, persistent=False)
        self.magnitude = nn.Parameter(w0_sq_norm.sqrt().clone())
        self.register_buffer("merged_norm", torch.zeros_like(w0_sq_norm), persistent=False)

    def _row_norm(self) -> torch.Tensor:
        """||W0 + s·BA|| per output row, without forming W0 + s·BA.

        ||w_i + s b_i A||² = ||w_i||² + 2s · b_i·(A w_iᵀ) + s² · b_i (A Aᵀ) b_iᵀ, where ||w_i||² is cached,
        A w_iᵀ comes from one (r, in) pass through the base layer, and A Aᵀ is r×r.
        """
        A, B, s = self.lora_A, self.lora_B, self.scaling
        cross = _base_linear(self.base, A).T.float()  # (out, r) = W0 Aᵀ
        gram = A @ A.T  # (r, r)
        sq_norm = self.w0_sq_norm + 2 * s * (B * cross).sum(dim=1) + s * s * ((B @ gram) * B).sum(dim=1)
        return sq_norm.clamp_min(0).sqrt()

    def weight_norm(self) -> torch.Tensor:
        """The per-row norm used by the forward pass; a constant in backward when ``detach_norm``."""
        gradient_mode = torch.no_grad() if self.detach_norm else contextlib.nullcontext()
        # The norm is a sum of large and small terms: compute it in float32 even under bf16 autocast.
        with gradient_mode, torch.autocast(device_type=self.lora_A.device.type, enabled=False):
            return self._row_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.magnitude / self.weight_norm()  # (out,)  m / ||W0 + s·BA||
        bias = self.base.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # The paper's equation: y = m / ||W0 + s·BA|| ⊙ (W0 x + s·B A x) + b, with a single base GEMM.
            down = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r) = A x
            directed = _plus_low_rank(_base_linear(self.base, x), down, self.lora_B, self.scaling)  # (W0 + s·BA) x
            y = directed * scale
            return (y + bias if bias is not None else y).to(directed.dtype)
        # With dropout (peft's convention): y = base(x) + (m/n - 1) ⊙ W0 drop(x) + (m/n) ⊙ s·BA drop(x).
        result = self.base(x)
        dropped = self.dropout(x)
        base_term = _base_linear(self.base, dropped)  # W0 drop(x): the dropped input needs its own GEMM
        update = (scale - 1) * base_term + scale * self.lora_path(dropped)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W' = m ⊙ (W0 + s·BA) / ||W0 + s·BA||; the norm is kept so that ``unmerge`` can invert it."""
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
