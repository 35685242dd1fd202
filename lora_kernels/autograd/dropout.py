"""Inverted dropout whose mask is regenerated from its seed in backward: ``seeded_dropout``.

For compositions that need dropout(x) itself rather than inside a fused layer (DoRA with dropout
runs a base GEMM on it): autograd keeps the 8-byte seed, never the [M, K] mask (``F.dropout`` keeps
the mask). The mask is the fused kernels' (``ops.dropout_keep_mask`` over the flattened rows of x),
so the same seed drops the same elements here and inside ``lora_linear``.
"""
import math

import torch
from torch.autograd import forward_ad as _forward_ad

from lora_kernels.ops import dropout_keep_mask, new_dropout_seed
from lora_kernels.ops.checks import check_dropout_p


def _keep_scaled(seed: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """keep / (1 - p) in x's dtype and shape (0 where dropped)."""
    rows = math.prod(x.shape[:-1])
    keep = dropout_keep_mask(seed, rows, x.shape[-1], p).view(x.shape)
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, p):
        ctx.save_for_backward(seed)
        ctx.p = p
        return x * _keep_scaled(seed, x, p)

    @staticmethod
    def backward(ctx, grad):
        seed, = ctx.saved_tensors
        return grad * _keep_scaled(seed, grad, ctx.p), None, None


def composite_needed(*tensors) -> bool:
    """Whether a call must run as plain differentiable PyTorch ops, which torch.func transforms and
    forward-mode AD see through: under a transform, or with a forward-mode AD dual tensor among
    ``tensors`` (the kernels and the autograd functions have no jvp and would drop its tangent)."""
    if torch._C._are_functorch_transforms_active():
        return True
    if _forward_ad._current_level < 0:  # no dual level: no dual tensors (the common case, one read)
        return False
    return any(isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def seeded_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of x [..., K]: x * keep / (1 - p), keep drawn from a seed taken from torch's
    RNG (reproducible under ``torch.manual_seed``); backward regenerates keep from the seed.
    Identity when not ``training`` or p = 0. Under torch.func transforms the same values as plain
    differentiable ops (the transforms do not see through the autograd function)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    p = check_dropout_p("p", p)
    if not training or p == 0.0:
        return x
    if x.dim() == 0:  # the mask is drawn over rows of K elements
        raise ValueError("x must have shape [..., K] (at least 1 dimension), got a 0-d tensor")
    seed = new_dropout_seed(x.device)
    if composite_needed(x):
        return x * _keep_scaled(seed, x, p)
    return _SeededDropout.apply(x, seed, p)
