"""Autograd for the QLoRA linear (NF4 base weight) and the public functional ``nf4_lora_linear``.

Saving rules are those of ``lora_linear`` (``autograd.lora_linear``): the NF4 tensors are saved by
reference (they are the frozen weight: no new memory), x only when lora_A needs a gradient, h only
when lora_B does, the dropout seed instead of a mask. No gradient ever flows to the NF4 weight.
``nf4_base_linear`` is the base layer alone (merged QLoRA layers), saving no decoded weight.
"""
import torch
import torch.nn.functional as F

from lora_kernels.autograd.lora_linear import (autocast_inputs, bias_and_dropout, custom_op_needed,
                                               eager_autograd_function, forward_route, lora_grads_to_inputs,
                                               save_for_lora_backward, saved_for_lora_backward)
from lora_kernels.ops.checks import check_nf4_lora_linear_args
from lora_kernels.ops.lora_linear import autocast_off
from lora_kernels.ops.nf4_lora_linear import (nf4_lora_linear_backward, nf4_lora_linear_bwd, nf4_lora_linear_composite,
                                              nf4_lora_linear_forward, nf4_lora_linear_fwd)

# Positions in nf4_lora_linear_fwd's inputs (x, the six NF4 tensors, lora_A, lora_B, bias, ...).
_X, _A, _B, _BIAS = 0, 7, 8, 9


def _setup_context(ctx, inputs, output):
    (x, *weights, lora_A, lora_B, bias, scale, dropout_p, seed, blocksize, nested_blocksize,
     weight_dtype) = inputs
    needs = ctx.needs_input_grad
    save_for_lora_backward(ctx, x, tuple(weights), lora_A, lora_B, output[1], seed, bias, scale, dropout_p,
                           needs[_X], needs[_A], needs[_B], needs[_BIAS])
    ctx.nf4_meta = (blocksize, nested_blocksize, weight_dtype)


def _backward(ctx, grad_y, grad_h):
    x, weights, lora_A, lora_B, h, seed = saved_for_lora_backward(ctx)
    backward = nf4_lora_linear_bwd if custom_op_needed(grad_y) else nf4_lora_linear_backward
    grads = backward(grad_y, x, *weights, lora_A, lora_B, h, seed, ctx.scale, ctx.dropout_p, *ctx.needs,
                     *ctx.nf4_meta)
    dx, d_a, d_b, d_bias = lora_grads_to_inputs(ctx, *grads)
    return (dx, *([None] * 6), d_a, d_b, d_bias) + (None,) * 6


nf4_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


NF4LoRALinearFunction = eager_autograd_function("NF4LoRALinearFunction", nf4_lora_linear_forward, _setup_context,
                                                _backward)


def nf4_lora_linear(x, qweight, lora_A, lora_B, scale, *, bias=None, lora_B_bias=None, dropout_p=0.0,
                    training=True):
    """QLoRA linear with PEFT ``lora.bnb.Linear4bit`` semantics, on a bitsandbytes NF4 weight.

        y = x dequant(qweight)^T + bias + scale * (dropout(x) A^T B^T + lora_B_bias)

    The weight is decoded tile by tile inside the GEMMs (row chunk by row chunk on the CPU path);
    the full-precision weight is never materialised, forward or backward.

    Args:
        x: [..., K], any leading dims and strides; float32, float16 or bfloat16.
        qweight: ``lora_kernels.NF4Weight`` of shape [N, K] on x's device (any stored dtype: the
            decoded weight is rounded to it, then cast to x's dtype, as bitsandbytes does).
        lora_A: [r, K], lora_B: [N, r]; x's dtype or float32. 1 <= r; r <= 256 runs the kernels.
        scale: alpha / r.
        bias: [N] or None. lora_B_bias: [N] or None.
        dropout_p: in [0, 1); applied to x's LoRA branch only when ``training``.
    Returns:
        y: [..., N] in x's dtype.
    """
    x, lora_A, lora_B, bias, lora_B_bias = autocast_inputs(x, lora_A, lora_B, bias, lora_B_bias)
    scale, dropout_p = check_nf4_lora_linear_args(x, qweight, lora_A, lora_B, scale, bias, lora_B_bias,
                                                  dropout_p)
    combined_bias, dropout_p, seed = bias_and_dropout(x, scale, bias, lora_B_bias, dropout_p, training)
    q = qweight
    forward = forward_route(nf4_lora_linear_fwd, NF4LoRALinearFunction, nf4_lora_linear_forward,
                            nf4_lora_linear_composite, x, *q.op_tensors(), lora_A, lora_B, combined_bias)
    y, _ = forward(x, *q.op_tensors(), lora_A, lora_B, combined_bias, scale, dropout_p, seed, q.blocksize,
                   q.nested_blocksize, q.dtype)
    return y


class _NF4BaseLinearFunction(torch.autograd.Function):
    """y = x dequant(qweight)^T + bias as bitsandbytes' MatMul4Bit computes it: the decoded weight
    [N, K] lives only during the forward's matmul, and backward decodes it again, so nothing N x K is
    saved (plain ``F.linear`` would keep the decoded copy for dX). ctx holds the NF4Weight itself:
    references to its tensors, as bnb's ctx holds its quant state. Not ``save_for_backward``, whose
    version check would guard in-place writes: none happens, since merge / unmerge / load_state_dict
    replace the NF4 tensors of a layer rather than write into them."""

    @staticmethod
    def forward(ctx, x, bias, qweight, decode_dtype):
        ctx.qweight, ctx.decode_dtype = qweight, decode_dtype
        return F.linear(x, _decoded(qweight, decode_dtype, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        # Plain differentiable ops on grad_y: a second derivative (create_graph=True) is exact here.
        need_x, need_bias = ctx.needs_input_grad[:2]
        dx = grad_y.matmul(_decoded(ctx.qweight, ctx.decode_dtype, grad_y.dtype)) if need_x else None
        dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_bias else None
        return dx, dbias, None, None


def _decoded(qweight, decode_dtype, compute_dtype):
    """bnb's chain: decoded to the stored dtype, cast to x's dtype (decode_dtype), then to the dtype
    the matmul runs in (autocast's, when it differs)."""
    weight = qweight.dequantize(decode_dtype)
    return weight if weight.dtype == compute_dtype else weight.to(compute_dtype)


def nf4_base_linear(x, qweight, bias=None):
    """The NF4 base layer alone (a merged QLoRA layer: no LoRA branch left), bitsandbytes'
    ``Linear4bit`` semantics: the weight decoded to its stored dtype, then cast to x's (then, under
    torch.autocast, to the autocast dtype, as F.linear casts it there).

    Args:
        x: [..., K] floating tensor on qweight's device (checked by the caller, the merged module).
        qweight: ``NF4Weight`` [N, K].
        bias: [N] in x's dtype, or None.
    Returns:
        y: [..., N] in x's dtype (under torch.autocast: in the autocast dtype, x and bias cast to it).

    Saved for backward: nothing but references to the NF4 tensors (the weight is decoded again).
    Under torch.compile, dispatch modes, tensor subclasses and torch.func transforms, and when no
    gradient can flow, it is the plain ``F.linear`` of the decoded weight.
    """
    decode_dtype = x.dtype
    x, bias = autocast_inputs(x, bias)
    with autocast_off(x.device):
        forward = forward_route(_plain_base_linear, _NF4BaseLinearFunction, _plain_base_linear, _plain_base_linear,
                                x, bias)
        return forward(x, bias, qweight, decode_dtype)


def _plain_base_linear(x, bias, qweight, decode_dtype):
    """``nf4_base_linear``'s every route but the autograd function's: differentiable PyTorch ops,
    which torch.compile, dispatch modes and torch.func see through (the decoded weight is saved for
    backward here, where a gradient flows at all)."""
    return F.linear(x, _decoded(qweight, decode_dtype, x.dtype), bias)
