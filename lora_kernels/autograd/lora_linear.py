"""Autograd for the fused LoRA linear and the public functional ``lora_linear``.

Saving rules (what backward needs, nothing else):
    x      only if lora_A needs a gradient (dA = dH^T dropout(x)); never under LoRA-FA.
    h      [M, r] only if lora_B needs a gradient (dB = scale * dY^T h).
    seed   int64 [1] only if dropout is active and dX or dA is needed; the mask is regenerated.
    weight, lora_A, lora_B by reference (parameters, no new memory).
"""
import functools

import torch

from lora_kernels.ops import (check_lora_linear_args, lora_linear_backward, lora_linear_bwd, lora_linear_composite,
                              lora_linear_forward, lora_linear_fwd, new_dropout_seed)
from lora_kernels.autograd.dropout import composite_needed
from lora_kernels.ops.lora_linear import autocast_enabled

try:  # private to torch (in 2.11 and 2.13, the versions we run): without it only dispatch modes lose the op route
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover
    def _get_current_dispatch_mode():
        return None


def save_for_lora_backward(ctx, x, weights: tuple, lora_A, lora_B, h, seed, bias, scale, dropout_p,
                           need_x, need_A, need_B, need_bias):
    """The saving rules above, shared by the dense and the NF4 layer: x [..., K] only when dA is needed,
    h [M, r] only when dB is, the dropout seed (int64 [1]) only when dX or dA is; lora_A [r, K],
    lora_B [N, r] always. ``weights``: the base weight's tensors (dense [N, K], or the NF4 ones;
    parameters or buffers: saved by reference, no new memory)."""
    ctx.mark_non_differentiable(h)
    ctx.num_weights = len(weights)
    ctx.save_for_backward(
        x if need_A else None,
        *weights,
        lora_A,
        lora_B,
        h if need_B else None,
        seed if (seed is not None and (need_x or need_A)) else None,
    )
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.needs = (bool(need_x), bool(need_A), bool(need_B), bool(need_bias))
    ctx.bias_dtype = bias.dtype if bias is not None else None


def saved_for_lora_backward(ctx):
    """(x, weights tuple, lora_A, lora_B, h, seed) as saved by ``save_for_lora_backward``."""
    x, *rest = ctx.saved_tensors
    weights = tuple(rest[:ctx.num_weights])
    lora_A, lora_B, h, seed = rest[ctx.num_weights:]
    return x, weights, lora_A, lora_B, h, seed


def lora_grads_to_inputs(ctx, dx, d_a, d_b, d_bias):
    """(dx [..., K], dA [r, K], dB [N, r], dbias [N]) with None where no gradient was asked for; dbias
    (fp32 from the implementations) cast to the bias' dtype."""
    need_x, need_A, need_B, need_bias = ctx.needs
    return (dx if need_x else None, d_a if need_A else None, d_b if need_B else None,
            d_bias.to(ctx.bias_dtype) if need_bias else None)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scale, dropout_p, seed = inputs
    need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
    save_for_lora_backward(ctx, x, (weight,), lora_A, lora_B, output[1], seed, bias, scale, dropout_p,
                           need_x, need_A, need_B, need_bias)


def _backward(ctx, grad_y, grad_h):
    x, (weight,), lora_A, lora_B, h, seed = saved_for_lora_backward(ctx)
    backward = lora_linear_bwd if custom_op_needed(grad_y) else lora_linear_backward
    grads = backward(grad_y, x, weight, lora_A, lora_B, h, seed, ctx.scale, ctx.dropout_p, *ctx.needs)
    dx, d_a, d_b, d_bias = lora_grads_to_inputs(ctx, *grads)
    return dx, None, d_a, d_b, d_bias, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def eager_autograd_function(name: str, implementation, setup_context, backward) -> type:
    """A custom op's autograd as a ``torch.autograd.Function`` subclass, for eager calls on plain
    tensors (``forward_route``): the same forward implementation, saving rules (``setup_context``)
    and backward, without the op's dispatch and autograd wrapper (~45 us per forward + backward on a
    CPU). Differentiable once, like the op."""
    def forward(ctx, *inputs):
        # ctx first, no setup_context attribute: Function.apply then skips binding the arguments to
        # the signature with inspect (~50 us a call).
        output = implementation(*inputs)
        setup_context(ctx, inputs, output)
        # The engine would hand backward a zero-filled tensor for each output no gradient reached:
        # h's on every backward (non-differentiable: never reached), allocated, filled (on a GPU one
        # more kernel per layer) and ignored. Only y's is built here, when none reached y.
        ctx.set_materialize_grads(False)
        y = output[0]
        ctx.y_spec = (y.shape, y.dtype, y.device)
        return output

    def backward_of_y(ctx, grad_y, *grads):
        if grad_y is None:
            shape, dtype, device = ctx.y_spec
            grad_y = torch.zeros(shape, dtype=dtype, device=device)
        return backward(ctx, grad_y, *grads)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager autograd of ``{implementation.__name__}`` (``eager_autograd_function``).",
        "forward": staticmethod(forward),
        "backward": staticmethod(first_derivative_only(functools.wraps(backward)(backward_of_y)))})


def first_derivative_only(backward):
    """``backward`` that raises a RuntimeError when autograd asks for its graph (create_graph=True: a
    second derivative to follow). ``torch.autograd.function.once_differentiable`` raises only when
    that second backward reaches its outputs, which it misses when the loss is linear in y or the
    second derivative is taken with respect to the adapters: the result was then silently wrong."""
    @functools.wraps(backward)
    def checked_backward(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs a backward in grad mode only for create_graph=True
            raise RuntimeError("lora_kernels: a second derivative through the fused LoRA layer is not supported "
                               "(backward with create_graph=True); torch.func transforms (e.g. "
                               "torch.func.grad of torch.func.grad) run it as differentiable PyTorch ops")
        return backward(ctx, *grads)
    return checked_backward


LoRALinearFunction = eager_autograd_function("LoRALinearFunction", lora_linear_forward, _setup_context, _backward)


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
    x, weight, lora_A, lora_B, bias, lora_B_bias = autocast_inputs(x, weight, lora_A, lora_B, bias, lora_B_bias)
    scale, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, lora_B_bias,
                                              dropout_p)
    combined_bias, dropout_p, seed = bias_and_dropout(x, scale, bias, lora_B_bias, dropout_p, training)
    forward = forward_route(lora_linear_fwd, LoRALinearFunction, lora_linear_forward, lora_linear_composite, x,
                            weight, lora_A, lora_B, combined_bias)
    y, _ = forward(x, weight, lora_A, lora_B, combined_bias, scale, dropout_p, seed)
    return y


def autocast_inputs(x, *tensors) -> tuple:
    """(x, *tensors), under torch.autocast for x's device cast to its dtype (floating tensors; None
    and others unchanged), as nn.Linear's matmul gets its input, weight and bias there: the layer
    then computes, and returns, in that dtype. Casts are differentiable: fp32 parameters still get
    fp32 gradients. The implementations themselves run without autocast (``ops.autocast_off``)."""
    if not isinstance(x, torch.Tensor) or not autocast_enabled(x.device.type):  # bad x: the checks say so
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in (x, *tensors))


def forward_route(custom_op, function, implementation, composite, *tensors):
    """The cheapest of the equivalent ways to run a forward (the first three give the same numbers,
    bit for bit):

    - ``composite`` under torch.func transforms (vmap, grad, jvp, jacrev, functional per-sample
      gradients): the same semantics as plain differentiable PyTorch ops, which the transforms see
      through; neither the op (no vmap rule, no functorch autograd) nor the autograd function
      (no setup_context, by design: see ``eager_autograd_function``) supports them;
    - ``custom_op`` (registered autograd and fake implementation) while torch.compile / export traces,
      under a dispatch mode (FakeTensorMode, ...) or for tensor subclasses (fake tensors): these see
      the op, not the PyTorch calls or kernel launches inside it;
    - else ``implementation`` itself when no gradient can flow (grad mode off, or nothing requires
      grad: inference, decoding);
    - else ``function.apply``: the autograd function with the op's saving rules and backward.

    Forward-mode AD (``torch.autograd.forward_ad`` dual tensors) also takes ``composite``: the kernels
    and the autograd function have no jvp, and would drop the tangent.

    tensors: the call's tensors, the base weight's included (None allowed).
    """
    if composite_needed(*tensors):
        return composite
    if custom_op_needed(*tensors):
        return custom_op
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return function.apply
    return implementation


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def custom_op_needed(*tensors) -> bool:
    """True while compiling / exporting, under a dispatch mode, or when a tensor is a subclass."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) not in _PLAIN_TENSOR_TYPES for t in tensors)


def bias_and_dropout(x, scale: float, bias, lora_B_bias, dropout_p: float, training: bool):
    """(combined bias or None, effective dropout_p, seed or None) for the custom ops."""
    combined_bias = bias
    if lora_B_bias is not None:
        # scale * lora_B_bias joins the bias in fp32; autograd routes dbias back to both.
        combined_bias = lora_B_bias.float() * scale
        if bias is not None:
            combined_bias = combined_bias + bias.float()
    if training and dropout_p > 0.0:
        return combined_bias, dropout_p, new_dropout_seed(x.device)
    return combined_bias, 0.0, None
