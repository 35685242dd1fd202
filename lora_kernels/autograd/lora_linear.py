"""Autograd for the fused LoRA linear and the public functional ``lora_linear``.

Saving rules (what backward needs, nothing else):
    x      only if lora_A needs a gradient (dA = dH^T dropout(x)); never under LoRA-FA.
    h      [M, r] only if lora_B needs a gradient (dB = scale * dY^T h).
    seed   int64 [1] only if dropout is active and dX or dA is needed; the mask is regenerated.
    weight, lora_A, lora_B by reference (parameters, no new memory).
"""
import torch

from lora_kernels.ops import check_lora_linear_args, lora_linear_bwd, lora_linear_fwd, new_dropout_seed


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scale, dropout_p, seed = inputs
    _, h = output
    need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(
        x if need_A else None,
        weight,
        lora_A,
        lora_B,
        h if need_B else None,
        seed if (seed is not None and (need_x or need_A)) else None,
    )
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.needs = (bool(need_x), bool(need_A), bool(need_B), bool(need_bias))
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y, grad_h):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    need_x, need_A, need_B, need_bias = ctx.needs
    dx, d_a, d_b, d_bias = lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, h, seed,
                                           ctx.scale, ctx.dropout_p, need_x, need_A, need_B, need_bias)
    return (dx if need_x else None, None, d_a if need_A else None, d_b if need_B else None,
            d_bias.to(ctx.bias_dtype) if need_bias else None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, lora_A, lora_B, scale, *, bias=None, lora_B_bias=None, dropout_p=0.0,
                training=True):
    """Fused LoRA linear with PEFT ``lora.Linear`` semantics.

        y = x W^T + bias + scale * (dropout(x) A^T B^T + lora_B_bias)

    Args:
        x: [..., K], any leading dims and strides; float32, float16 or bfloat16.
        weight: [N, K] frozen base weight, x's dtype (must not require grad).
        lora_A: [r, K], lora_B: [N, r]; x's dtype or float32 (then the LoRA branch accumulates in
            fp32, like PEFT's autocast_adapter_dtype). 1 <= r; r <= 256 runs the kernels.
        scale: alpha / r.
        bias: [N] or None. lora_B_bias: [N] or None (PEFT's lora_bias=True).
        dropout_p: in [0, 1); applied to x's LoRA branch only when ``training``.
    Returns:
        y: [..., N] in x's dtype.
    """
    scale, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, lora_B_bias,
                                              dropout_p)
    combined_bias = bias
    if lora_B_bias is not None:
        # scale * lora_B_bias joins the bias in fp32; autograd routes dbias back to both.
        combined_bias = lora_B_bias.float() * scale
        if bias is not None:
            combined_bias = combined_bias + bias.float()
    seed = None
    if training and dropout_p > 0.0:
        seed = new_dropout_seed(x.device)
    else:
        dropout_p = 0.0
    y, _ = lora_linear_fwd(x, weight, lora_A, lora_B, combined_bias, scale, dropout_p, seed)
    return y
