"""``torch.library`` custom ops for the fused LoRA linear, with fake (meta) implementations.

    lora_kernels::lora_linear_fwd(x, weight, lora_A, lora_B, bias?, scale, dropout_p, seed?)
        -> (y [..., N], h [M, r])
    lora_kernels::lora_linear_bwd(grad_y, x?, weight, lora_A, lora_B, h?, seed?, scale, dropout_p,
                                  need_x, need_A, need_B, need_bias)
        -> (dx [..., K], dA [r, K], dB [N, r], dbias [N] fp32); gradients not asked for come back as
           empty tensors (custom ops cannot return None).

``bias`` is the combined bias + scale * lora_B_bias. ``seed`` (int64 [1]) is present exactly when
dropout is active. Arguments are checked by the public function (``lora_kernels.lora_linear``).
Which implementation runs is decided per call (``select_backend``): Triton kernels for CUDA tensors
(and for CPU tensors under TRITON_INTERPRET=1), the lean PyTorch path otherwise, and on CUDA too for
dense calls of at most DENSE_TORCH_MAX_M rows without dropout, where the launches' host time is the
cost.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from lora_kernels.kernels import configs
from lora_kernels.kernels.configs import MAX_RANK
from lora_kernels.ops.checks import env_nonnegative_int, env_text, takes_cuda_routes
from lora_kernels.ops.reference import composite_lora_forward, torch_lora_backward, torch_lora_forward
from lora_kernels.ops.triton_launch import is_interpreted, triton_lora_backward, triton_lora_forward

CPU_BACKEND_ENV = "LORA_KERNELS_CPU_BACKEND"  # "auto" (default), "torch" or "triton"
# Overrides configs.DENSE_TORCH_MAX_M (read per call); 0 keeps every CUDA call on the Triton kernels.
DENSE_TORCH_MAX_M_ENV = "LORA_KERNELS_DENSE_TORCH_MAX_M"


def select_backend(device: torch.device, M: int, N: int, K: int, r: int, small_m_torch: bool = False) -> str:
    """"triton" or "torch" for a problem of x [M, K], weight [N, K], rank r on ``device``.

    Empty problems and ranks above MAX_RANK take the PyTorch path on every device. CUDA tensors
    take Triton, except calls that allow the small-M route (``small_m_torch``: a dense weight, no
    dropout) with M <= configs.DENSE_TORCH_MAX_M (LORA_KERNELS_DENSE_TORCH_MAX_M). CPU tensors take
    Triton only under the interpreter; LORA_KERNELS_CPU_BACKEND overrides.
    """
    if M == 0 or N == 0 or K == 0 or r > MAX_RANK:
        return "torch"
    if takes_cuda_routes(device):
        if small_m_torch and M <= env_nonnegative_int(DENSE_TORCH_MAX_M_ENV, configs.DENSE_TORCH_MAX_M):
            return "torch"
        return "triton"
    if device.type == "cpu":
        choice = env_text(CPU_BACKEND_ENV, "auto")
        if choice not in ("auto", "torch", "triton"):
            raise ValueError(f"{CPU_BACKEND_ENV} must be auto, torch or triton, got {choice!r}")
        if choice == "triton" and not is_interpreted():
            raise ValueError(f"{CPU_BACKEND_ENV}=triton needs TRITON_INTERPRET=1 set before triton is imported")
        if choice == "torch":
            return "torch"
        return "triton" if is_interpreted() else "torch"
    return "torch"


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):
        return False


def autocast_off(device: torch.device):
    """A context without torch.autocast for ``device``: the implementations compute in their inputs'
    dtypes, as the Triton kernels always do (under autocast the public functions cast the inputs
    first); autocast inside would turn the PyTorch path's matmuls to 16 bits and break the dtypes
    the fake implementations and the backward expect."""
    if autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def with_leading_dims(t2: Tensor, like: Tensor) -> Tensor:
    """t2 [M, C] as [*like.shape[:-1], C], sharing its memory but not an autograd view of it: what a
    custom op or autograd function returns as a view of a tensor made inside it may not be modified
    in place (autograd refuses: "this view was created inside a custom Function"), and users modify
    a linear layer's output in place (``y += residual``, ``ReLU(inplace=True)``). aten's
    ``_unsafe_view`` is the reshape that nn.Linear's own matmul returns for the same reason. A 2-D
    ``like`` and a t2 that is no view come back as they are (one host op less per call)."""
    if like.dim() == 2 and t2._base is None:
        return t2
    return torch.ops.aten._unsafe_view(t2, (*like.shape[:-1], t2.shape[-1]))


def as_rows(t: Tensor) -> Tensor:
    """t [..., C] as [M, C] (t itself when 2-D)."""
    return t if t.dim() == 2 else t.reshape(_rows(t), t.shape[-1])


def lora_linear_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                        scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The forward implementation: (y [..., N], h [M, r]). The custom op ``lora_linear_fwd`` runs it;
    eager calls on plain tensors skip the op (``autograd.lora_linear.forward_route``): directly when
    no gradient is needed, through an autograd function otherwise."""
    K = x.shape[-1]
    N, r = lora_B.shape
    x2 = as_rows(x)
    backend = select_backend(x.device, x2.shape[0], N, K, r, small_m_torch=seed is None)
    impl = triton_lora_forward if backend == "triton" else torch_lora_forward
    with autocast_off(x.device):
        y2, h = impl(x2, weight, lora_A, lora_B, bias, scale, dropout_p, seed)
    return with_leading_dims(y2, x), h


def lora_linear_composite(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                          scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``lora_linear_forward``'s semantics as differentiable PyTorch ops on every device
    (``reference.composite_lora_forward``: no autograd function, no kernels), for autograd and
    torch.func to differentiate. What ``forward_route`` takes under torch.func transforms (vmap,
    grad, jvp, jacrev...), which neither the op nor the eager autograd function supports.
    (y [..., N], h [M, r])."""
    x2 = as_rows(x)
    with autocast_off(x.device):
        y2, h = composite_lora_forward(x2, weight, lora_A, lora_B, bias, scale, dropout_p, seed)
    return y2.reshape(*x.shape[:-1], y2.shape[-1]), h


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                    scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Custom op of ``lora_linear_forward``: x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r],
    bias [N] or None, seed int64 [1] or None (no dropout) -> (y [..., N] in x's dtype, h =
    dropout(x)·Aᵀ [M, r] in A's dtype, M the product of x's leading dims)."""
    return lora_linear_forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed)


@lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    N, r = lora_B.shape
    y = x.new_empty((*x.shape[:-1], N))
    h = x.new_empty((_rows(x), r), dtype=lora_A.dtype)
    return y, h


def lora_linear_backward(grad_y: Tensor, x: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                         h: Optional[Tensor], seed: Optional[Tensor], scale: float, dropout_p: float,
                         need_x: bool, need_A: bool, need_B: bool, need_bias: bool) -> tuple:
    """The backward implementation: (dx [..., K], dA [r, K], dB [N, r], dbias [N] fp32), None for each
    gradient not asked for. The custom op ``lora_linear_bwd`` runs it; the eager autograd function
    (``autograd.lora_linear``) calls it directly."""
    N, K = weight.shape
    r = lora_A.shape[0]
    check_saved_for_backward("lora_linear_bwd", x, h, need_A, need_B)
    grad_y2 = as_rows(grad_y)
    x2 = as_rows(x) if x is not None else None
    backend = select_backend(grad_y.device, grad_y2.shape[0], N, K, r, small_m_torch=seed is None)
    impl = triton_lora_backward if backend == "triton" else torch_lora_backward
    with autocast_off(grad_y.device):
        dx2, d_a, d_b, d_bias = impl(grad_y2, x2, weight, lora_A, lora_B, h, seed, scale, dropout_p,
                                     need_x, need_A, need_B, need_bias)
    return grads_asked_for(grad_y, (dx2, d_a, d_b, d_bias), (need_x, need_A, need_B, need_bias))


def check_saved_for_backward(op: str, x: Optional[Tensor], h: Optional[Tensor], need_A: bool, need_B: bool):
    """dA needs x and dB needs h: a ValueError naming the op when the caller did not pass them."""
    if need_A and x is None:
        raise ValueError(f"{op}: need_A requires x")
    if need_B and h is None:
        raise ValueError(f"{op}: need_B requires h")


def grads_asked_for(grad_y: Tensor, grads: tuple, needs: tuple) -> tuple:
    """(dx [..., K] with grad_y's leading dims, dA, dB, dbias), None where ``needs`` says no."""
    dx2, d_a, d_b, d_bias = (g if need else None for g, need in zip(grads, needs))
    return (with_leading_dims(dx2, grad_y) if dx2 is not None else None), d_a, d_b, d_bias


def op_outputs(grad_y: Tensor, grads: tuple) -> tuple:
    """Gradients as a backward custom op returns them: custom ops cannot return None and their
    outputs may not alias each other, so a fresh empty [0] tensor (grad_y's dtype and device) stands
    for each one not asked for."""
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad_y: Tensor, x: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    h: Optional[Tensor], seed: Optional[Tensor], scale: float, dropout_p: float,
                    need_x: bool, need_A: bool, need_B: bool,
                    need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom op of ``lora_linear_backward``: grad_y [..., N], x [..., K] (may be None unless need_A),
    h [M, r] (None when dB is not needed) -> (dx [..., K], dA [r, K], dB [N, r], dbias [N]
    fp32), an empty [0] tensor for each gradient whose ``need_*`` is False (``op_outputs``)."""
    return op_outputs(grad_y, lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, seed, scale, dropout_p,
                                                   need_x, need_A, need_B, need_bias))


@lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(grad_y, x, weight, lora_A, lora_B, h, seed, scale, dropout_p,
                          need_x, need_A, need_B, need_bias):
    N, K = weight.shape
    return (grad_y.new_empty((*grad_y.shape[:-1], K)) if need_x else grad_y.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_A else grad_y.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_B else grad_y.new_empty(0),
            grad_y.new_empty((N,), dtype=torch.float32) if need_bias else grad_y.new_empty(0))
