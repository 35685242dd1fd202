"""``torch.library`` custom ops for the QLoRA linear (NF4 base weight), with fake implementations.

    lora_kernels::nf4_lora_linear_fwd(x, packed, absmax, absmax_code?, absmax_scale?, absmax_offset?,
                                      code, lora_A, lora_B, bias?, scale, dropout_p, seed?,
                                      blocksize, nested_blocksize, weight_dtype) -> (y [..., N], h [M, r])
    lora_kernels::nf4_lora_linear_bwd(grad_y, x?, <the same weight tensors>, lora_A, lora_B, h?, seed?,
                                      scale, dropout_p, need_x, need_A, need_B, need_bias, ...)
        -> (dx [..., K], dA [r, K], dB [N, r], dbias [N] fp32); unneeded gradients are empty tensors.
    lora_kernels::nf4_dequantize(<weight tensors>, numel, blocksize, nested_blocksize, weight_dtype)
        -> flat [numel] in weight_dtype, bit-exact with bitsandbytes' dequantize_4bit.

The NF4 weight travels as its tensors (``triton_launch.NF4Tensors``): custom ops take tensors and
scalars, not Python objects. Semantics, saving rules and backends are those of ``ops.lora_linear``;
the only difference is where W comes from (decoded tile by tile in the kernels, row chunk by row
chunk on the CPU path), so the full-precision weight is never materialised.
"""
from typing import Optional

import torch
from torch import Tensor

from lora_kernels.ops.lora_linear import (_rows, as_rows, autocast_off, check_saved_for_backward, grads_asked_for,
                                         lora_linear_composite, op_outputs, select_backend, with_leading_dims)
from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.nf4_gemv import cuda_gemv_forward, use_cuda_gemv
from lora_kernels.ops.reference import nf4_decode_range, torch_lora_backward, torch_lora_forward
from lora_kernels.ops.triton_launch import (is_interpreted, triton_lora_backward, triton_lora_forward,
                                            triton_nf4_dequantize)


def _nf4(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize,
         nested_blocksize, weight_dtype) -> NF4Tensors:
    return NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize,
                      nested_blocksize, weight_dtype)


@torch.library.custom_op("lora_kernels::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                   absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], code: Tensor,
                   numel: int, blocksize: int, nested_blocksize: int, weight_dtype: torch.dtype) -> Tensor:
    """The flat [numel] weight in ``weight_dtype``, bit for bit bitsandbytes' ``dequantize_4bit``, from
    an NF4 weight's tensors (``NF4Weight.op_tensors()``: packed uint8 [(numel + 1) // 2, 1], absmax
    fp32 [n_blocks] or uint8 with absmax_code fp32 [256], absmax_scale fp32 [n_blocks / nested
    blocksize, rounded up], absmax_offset fp32 0-d; code fp32 [16])."""
    wq = _nf4(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, 1, numel, blocksize,
              nested_blocksize, weight_dtype)
    if numel > 0 and (packed.device.type == "cuda" or (packed.device.type == "cpu" and is_interpreted())):
        return triton_nf4_dequantize(wq, numel)
    return nf4_decode_range(wq, 0, numel)


@nf4_dequantize.register_fake
def _nf4_dequantize_fake(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, numel,
                         blocksize, nested_blocksize, weight_dtype):
    return packed.new_empty((numel,), dtype=weight_dtype)


def nf4_lora_linear_forward(x: Tensor, packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                            absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], code: Tensor,
                            lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], scale: float,
                            dropout_p: float, seed: Optional[Tensor], blocksize: int, nested_blocksize: int,
                            weight_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The forward implementation run by the custom op ``nf4_lora_linear_fwd`` (eager calls on plain
    tensors skip the op, as for ``lora_linear_forward``): (y [..., N], h [M, r])."""
    K = x.shape[-1]
    N, r = lora_B.shape
    wq = _nf4(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize,
              nested_blocksize, weight_dtype)
    x2 = as_rows(x)
    backend = select_backend(x.device, x2.shape[0], N, K, r)
    with autocast_off(x.device):
        if backend == "triton" and use_cuda_gemv(x2, lora_A, dropout_p, seed, wq):
            y2, h = cuda_gemv_forward(x2, wq, lora_A, lora_B, bias, scale)
        elif backend == "triton":
            y2, h = triton_lora_forward(x2, packed, lora_A, lora_B, bias, scale, dropout_p, seed, wq=wq)
        else:
            y2, h = torch_lora_forward(x2, None, lora_A, lora_B, bias, scale, dropout_p, seed, wq=wq)
    return with_leading_dims(y2, x), h


def nf4_lora_linear_composite(x: Tensor, packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                              absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], code: Tensor,
                              lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], scale: float,
                              dropout_p: float, seed: Optional[Tensor], blocksize: int, nested_blocksize: int,
                              weight_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y [..., N], h [M, r]): ``nf4_lora_linear_forward``'s semantics as differentiable PyTorch ops, for torch.func
    transforms (see ``lora_linear_composite``). The one path that decodes the whole weight at once
    (bit-exact, then cast to x's dtype as bitsandbytes does): the transforms differentiate through
    it, and chunked decoding writes into slices (``out=``), which autograd refuses."""
    K = x.shape[-1]
    N = lora_B.shape[0]
    wq = _nf4(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize,
              nested_blocksize, weight_dtype)
    weight = nf4_decode_range(wq, 0, N * K).view(N, K).to(x.dtype) if N * K else x.new_empty((N, K))
    return lora_linear_composite(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed)


@torch.library.custom_op("lora_kernels::nf4_lora_linear_fwd", mutates_args=())
def nf4_lora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                        absmax_scale: Optional[Tensor], absmax_offset: Optional[Tensor], code: Tensor,
                        lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], scale: float,
                        dropout_p: float, seed: Optional[Tensor], blocksize: int, nested_blocksize: int,
                        weight_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Custom op of ``nf4_lora_linear_forward``: x [..., K], the NF4 weight [N, K] as its tensors
    (``nf4_dequantize``), lora_A [r, K], lora_B [N, r], bias [N] or None, seed int64 [1] or None ->
    (y [..., N] in x's dtype, h [M, r] in A's dtype)."""
    return nf4_lora_linear_forward(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A,
                                   lora_B, bias, scale, dropout_p, seed, blocksize, nested_blocksize,
                                   weight_dtype)


@nf4_lora_linear_fwd.register_fake
def _nf4_lora_linear_fwd_fake(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A,
                              lora_B, bias, scale, dropout_p, seed, blocksize, nested_blocksize, weight_dtype):
    N, r = lora_B.shape
    return x.new_empty((*x.shape[:-1], N)), x.new_empty((_rows(x), r), dtype=lora_A.dtype)


def nf4_lora_linear_backward(grad_y: Tensor, x: Optional[Tensor], packed: Tensor, absmax: Tensor,
                             absmax_code: Optional[Tensor], absmax_scale: Optional[Tensor],
                             absmax_offset: Optional[Tensor], code: Tensor, lora_A: Tensor, lora_B: Tensor,
                             h: Optional[Tensor], seed: Optional[Tensor], scale: float, dropout_p: float,
                             need_x: bool, need_A: bool, need_B: bool, need_bias: bool, blocksize: int,
                             nested_blocksize: int, weight_dtype: torch.dtype) -> tuple:
    """The backward implementation run by the custom op ``nf4_lora_linear_bwd`` (and directly by the
    eager autograd function): (dx [..., K], dA [r, K], dB [N, r], dbias [N] fp32), None for each
    gradient not asked for."""
    N, r = lora_B.shape
    K = lora_A.shape[1]
    check_saved_for_backward("nf4_lora_linear_bwd", x, h, need_A, need_B)
    wq = _nf4(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize,
              nested_blocksize, weight_dtype)
    grad_y2 = as_rows(grad_y)
    x2 = as_rows(x) if x is not None else None
    backend = select_backend(grad_y.device, grad_y2.shape[0], N, K, r)
    impl = triton_lora_backward if backend == "triton" else torch_lora_backward
    needs = (need_x, need_A, need_B, need_bias)
    with autocast_off(grad_y.device):
        grads = impl(grad_y2, x2, packed if backend == "triton" else None, lora_A, lora_B, h, seed, scale,
                     dropout_p, *needs, wq=wq)
    return grads_asked_for(grad_y, grads, needs)


@torch.library.custom_op("lora_kernels::nf4_lora_linear_bwd", mutates_args=())
def nf4_lora_linear_bwd(grad_y: Tensor, x: Optional[Tensor], packed: Tensor, absmax: Tensor,
                        absmax_code: Optional[Tensor], absmax_scale: Optional[Tensor],
                        absmax_offset: Optional[Tensor], code: Tensor, lora_A: Tensor, lora_B: Tensor,
                        h: Optional[Tensor], seed: Optional[Tensor], scale: float, dropout_p: float,
                        need_x: bool, need_A: bool, need_B: bool, need_bias: bool, blocksize: int,
                        nested_blocksize: int,
                        weight_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom op of ``nf4_lora_linear_backward``: as ``lora_linear_bwd`` with the NF4 weight's
    tensors in place of the dense weight -> (dx [..., K], dA [r, K], dB [N, r], dbias [N] fp32),
    an empty [0] tensor for each gradient not asked for."""
    return op_outputs(grad_y, nf4_lora_linear_backward(
        grad_y, x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, h, seed,
        scale, dropout_p, need_x, need_A, need_B, need_bias, blocksize, nested_blocksize, weight_dtype))


@nf4_lora_linear_bwd.register_fake
def _nf4_lora_linear_bwd_fake(grad_y, x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code,
                              lora_A, lora_B, h, seed, scale, dropout_p, need_x, need_A, need_B,
                              need_bias, blocksize, nested_blocksize, weight_dtype):
    N = lora_B.shape[0]
    K = lora_A.shape[1]
    return (grad_y.new_empty((*grad_y.shape[:-1], K)) if need_x else grad_y.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_A else grad_y.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_B else grad_y.new_empty(0),
            grad_y.new_empty((N,), dtype=torch.float32) if need_bias else grad_y.new_empty(0))
