"""Core guarantees of the public lora_linear: float64 agreement, PEFT equality, dropout mask
regeneration, LoRA-FA saving, torch.compile, input errors. Both CPU backends."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import lora_kernels
from lora_kernels.ops import dropout_keep_mask, lora_linear_reference
from tests.helpers import keep_mask_for, rel_err

BOUNDS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def _inputs(lead, K, N, r, dtype, adapter_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype).requires_grad_(True)
    B = torch.randn(N, r, generator=g).to(adapter_dtype).requires_grad_(True)
    return x, W, A, B


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 40), K=st.integers(1, 70), N=st.integers(1, 70), r=st.integers(1, 128),
       p=st.sampled_from([0.0, 0.3]), dtypes=st.sampled_from(
           [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16)]))
# Found by a local run: the base and LoRA terms nearly cancel (y = 1.68 - 1.47), which exposed the
# PyTorch path rounding h and B to fp16 before adding an fp32-adapter LoRA term.
@example(M=1, K=1, N=1, r=3, p=0.0, dtypes=(torch.float16, torch.float32))
def test_forward_and_grads_match_float64(cpu_backend, M, K, N, r, p, dtypes):
    dtype, adapter_dtype = dtypes
    x, W, A, B = _inputs((M,), K, N, r, dtype, adapter_dtype, seed=M * 1000 + K)
    torch.manual_seed(11)
    y = lora_kernels.lora_linear(x, W, A, B, 0.5, dropout_p=p)
    grad_y = torch.randn(M, N).to(dtype)
    y.backward(grad_y)
    keep = None
    if p:
        torch.manual_seed(11)
        keep = dropout_keep_mask(torch.randint(0, 2**62, (1,), dtype=torch.int64), M, K, p)
    def float64_reference(absolute):
        # absolute: the same computation on |inputs| (magnitudes for the cancellation floor)
        up = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        ref = [up(t).requires_grad_(True) for t in (x, A, B)]
        y_ref = lora_linear_reference(ref[0], up(W), ref[1], ref[2], 0.5, keep_mask=keep, dropout_p=p)
        y_ref.backward(up(grad_y))
        return y_ref.detach(), [t.grad for t in ref]

    (y_ref, grads_ref), (y_mag, grads_mag) = float64_reference(False), float64_reference(True)
    bound = BOUNDS[dtype]
    assert y.dtype == dtype and rel_err(y, y_ref, y_mag) < bound
    for got, want, mag in zip((x, A, B), grads_ref, grads_mag):
        assert got.grad.dtype == got.dtype and rel_err(got.grad, want, mag) < bound


def test_matches_peft_linear(cpu_backend):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=True)
    base.weight.requires_grad_(False)  # PEFT freezes the base weight when it wraps a model
    layer = PeftLinear(base, adapter_name="default", config=LoraConfig(r=6, lora_alpha=12), r=6, lora_alpha=12)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 7, 48, requires_grad=True)
    y_peft = layer(x)
    grad_y = torch.randn_like(y_peft)
    y_peft.backward(grad_y)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    peft_grads = [x.grad.clone(), A.grad.clone(), B.grad.clone(), base.bias.grad.clone()]
    for t in (x, A, B, base.bias):
        t.grad = None
    y = lora_kernels.lora_linear(x, base.weight, A, B, layer.scaling["default"], bias=base.bias)
    y.backward(grad_y)
    assert _rel(y, y_peft.detach().double()) < 1e-5
    for got, want in zip((x.grad, A.grad, B.grad, base.bias.grad), peft_grads):
        assert _rel(got, want.double()) < 1e-5


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_fa_saves_only_h(cpu_backend, p):
    x, W, A, B = _inputs((4, 9), 32, 24, 5, torch.float32, torch.float32, seed=3)
    A.requires_grad_(False)
    params = {id(t) for t in (W, A, B)}
    y, saved = _saved(lambda: lora_kernels.lora_linear(x, W, A, B, 0.5, dropout_p=p))
    activations = [t for t in saved if id(t) not in params]
    shapes = sorted(tuple(t.shape) for t in activations)
    expected = [(1,), (36, 5)] if p else [(36, 5)]
    assert shapes == expected
    assert all(t.data_ptr() != x.data_ptr() for t in activations)
    y.sum().backward()
    assert x.grad is not None and B.grad is not None and A.grad is None


def test_trainable_A_saves_x(cpu_backend):
    x, W, A, B = _inputs((10,), 16, 12, 3, torch.float32, torch.float32, seed=4)
    _, saved = _saved(lambda: lora_kernels.lora_linear(x, W, A, B, 0.5))
    assert any(t is x for t in saved)


def test_dropout_reproducible_and_rng_untouched_without_it(cpu_backend):
    x, W, A, B = _inputs((30,), 40, 20, 4, torch.float32, torch.float32, seed=5)
    torch.manual_seed(3)
    y1 = lora_kernels.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = lora_kernels.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    y3 = lora_kernels.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    state = torch.get_rng_state()
    y_eval = lora_kernels.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, training=False)
    y_p0 = lora_kernels.lora_linear(x, W, A, B, 1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y_eval, y_p0)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_torch_compile_fullgraph(cpu_backend, p):
    x, W, A, B = _inputs((2, 5), 24, 16, 4, torch.float32, torch.float32, seed=6)

    def step(x, A, B):
        return lora_kernels.lora_linear(x, W, A, B, 0.5, dropout_p=p).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    compiled(x, A, B).backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    torch.manual_seed(1)
    step(x, A, B).backward()
    for got, t in zip(grads, (x, A, B)):
        assert torch.allclose(got, t.grad, rtol=1e-6, atol=1e-6)
    # and both against float64, with the mask of the seed drawn after manual_seed(1)
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    x_drop = x64 * keep_mask_for(1, 10, 24, p, "cpu").view(2, 5, 24) / (1 - p) if p else x64
    (x64 @ W.double().t() + 0.5 * (x_drop @ A64.t()) @ B64.t()).square().sum().backward()
    for got, t in zip(grads, (x64, A64, B64)):
        assert rel_err(got, t.grad) < 1e-5


def test_bad_inputs_name_the_argument():
    x, W, A, B = (t.detach() for t in _inputs((5,), 8, 6, 2, torch.float32, torch.float32, seed=7))
    f = lora_kernels.lora_linear
    cases = [
        (lambda: f(x[:, :7], W, A, B, 1.0), ValueError, "x"),
        (lambda: f(x, W, A[:, :7], B, 1.0), ValueError, "lora_A"),
        (lambda: f(x, W, A, B[:, :1], 1.0), ValueError, "lora_B"),
        (lambda: f(x, W, A, B, 1.0, bias=torch.randn(5)), ValueError, "bias"),
        (lambda: f(x, W, A[:0], B[:, :0], 1.0), ValueError, "r >= 1"),
        (lambda: f(x, W.to("meta"), A, B, 1.0), ValueError, "weight"),
        (lambda: f(x, W.double(), A, B, 1.0), TypeError, "weight"),
        (lambda: f(x.half(), W.half(), A.bfloat16(), B.bfloat16(), 1.0), ValueError, "lora_A"),
        (lambda: f(x, W, A, B, 1.0, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: f(x, W, A, B, 1.0, dropout_p=-0.1), ValueError, "dropout_p"),
        (lambda: f(x, W, A, B, 1.0, dropout_p="0.1"), TypeError, "dropout_p"),
        (lambda: f(x.long(), W, A, B, 1.0), TypeError, "x"),
        (lambda: f(x, W, A, B, "s"), TypeError, "scale"),
        (lambda: f(x, W.requires_grad_(True), A, B, 1.0), ValueError, "weight"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
