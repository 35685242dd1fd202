"""Without autograd (no_grad, or no input requiring grad) and outside torch.compile, the public
functions run the forward implementation directly instead of through the custom op: same numbers,
bit for bit; with a gradient to compute, or while compiling, the custom op runs."""
import importlib
import math

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight
# The modules (the package re-exports functions of the same names).
dense_mod = importlib.import_module("lora_kernels.autograd.lora_linear")
nf4_mod = importlib.import_module("lora_kernels.autograd.nf4_lora_linear")


def _args(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 64, generator=g)
    W = torch.randn(24, 64, generator=g) / 8
    A = torch.randn(4, 64, generator=g).requires_grad_(True)
    B = torch.randn(24, 4, generator=g).requires_grad_(True)
    return x, W, A, B


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("nf4", [False, True])
def test_direct_path_without_grad_and_op_path_with_grad(monkeypatch, nf4):
    mod, op, impl = ((nf4_mod, "nf4_lora_linear_fwd", "nf4_lora_linear_forward") if nf4 else
                     (dense_mod, "lora_linear_fwd", "lora_linear_forward"))
    op_calls, impl_calls = _spy(monkeypatch, mod, op), _spy(monkeypatch, mod, impl)
    x, W, A, B = _args()
    weight = NF4Weight.quantize(W) if nf4 else W
    fn = lora_kernels.nf4_lora_linear if nf4 else lora_kernels.lora_linear
    bias = torch.randn(24)
    y_grad = fn(x, weight, A, B, 0.5, bias=bias)                      # A, B require grad: the op
    assert op_calls == [op] and impl_calls == [] and y_grad.requires_grad
    with torch.no_grad():
        y_nograd = fn(x, weight, A, B, 0.5, bias=bias)                # no grad mode: direct
    y_frozen = fn(x, weight, A.detach(), B.detach(), 0.5, bias=bias)  # nothing requires grad: direct
    assert op_calls == [op] and impl_calls == [impl, impl]
    assert torch.equal(y_nograd, y_grad.detach()) and torch.equal(y_frozen, y_grad.detach())
    assert not y_nograd.requires_grad and not y_frozen.requires_grad
    y_grad.sum().backward()
    assert A.grad is not None and math.isfinite(float(A.grad.sum()))


def test_compiling_uses_the_op(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dense_mod.direct_call_ok(torch.zeros(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert dense_mod.direct_call_ok(torch.zeros(1), None)
    assert not dense_mod.direct_call_ok(torch.zeros(1, requires_grad=True))
