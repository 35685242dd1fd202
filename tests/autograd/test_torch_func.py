"""torch.func transforms (vmap, grad, jvp, jacrev) over the public functions: ``forward_route`` takes
the composite route (the PyTorch path's differentiable ops) there, since neither the custom op nor
the eager autograd function supports them (both raised before). Checked against float64 references:
per-sample gradients, forward-mode derivatives, Jacobians; dropout follows vmap's randomness flag."""
import pytest
import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.ops import lora_linear_reference
from tests.helpers import BOUNDS, assert_close, bnb_dequantized, keep_mask_for, rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B_SAMPLES, T, K, N, R, SCALE = 4, 3, 64, 24, 4, 0.5
FP32 = 2e-6

pytestmark = pytest.mark.usefixtures("poisoned")


def _problem(nf4: bool, device: str, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, div=1.0):
        return (torch.randn(*shape, generator=g) / div).to(device)

    W = rand(N, K, div=8)
    p = dict(x=rand(B_SAMPLES, T, K), A=rand(R, K), B=rand(N, R), bias=rand(N), lora_B_bias=rand(N),
             cotangent=rand(T, N))
    q = NF4Weight.quantize(W.cpu()) if nf4 else None
    p["weight"] = q.to(device) if nf4 else W
    # the weight the reference sees, as bitsandbytes decodes it (not the decode under test)
    p["dense"] = (bnb_dequantized(q).to(device) if nf4 else W).double()
    return p


def _ours(p, nf4, dropout_p=0.0):
    fn = lora_kernels.nf4_lora_linear if nf4 else lora_kernels.lora_linear

    def forward(x, A, B, bias, lora_B_bias):
        return fn(x, p["weight"], A, B, SCALE, bias=bias, lora_B_bias=lora_B_bias, dropout_p=dropout_p)
    return forward


def _reference(p):
    def forward(x, A, B, bias, lora_B_bias):
        return lora_linear_reference(x, p["dense"], A, B, SCALE, bias=bias, lora_B_bias=lora_B_bias)
    return forward


def _args(p, dtype=None):
    return tuple(p[k].to(dtype) if dtype else p[k] for k in ("x", "A", "B", "bias", "lora_B_bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_vmap_over_x_matches_float64(nf4, device):
    p = _problem(nf4, device)
    x, *params = _args(p)
    y = vmap(_ours(p, nf4), in_dims=(0, None, None, None, None))(x, *params)
    expected = _reference(p)(*_args(p, torch.float64))
    assert y.shape == (B_SAMPLES, T, N) and y.dtype == torch.float32
    assert rel_err(y, expected) < FP32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_per_sample_gradients_match_float64(nf4, device):
    # DP-SGD style: one gradient of A, B and both biases per sample, by vmap(grad(loss)).
    p = _problem(nf4, device)

    def loss(forward):
        return lambda x, *params: (forward(x, *params) * p["cotangent"].to(x.dtype)).sum()

    per_sample = vmap(grad(loss(_ours(p, nf4)), argnums=(1, 2, 3, 4)),
                      in_dims=(0, None, None, None, None))(*_args(p))
    x64, *params64 = _args(p, torch.float64)
    for i in range(B_SAMPLES):
        expected = grad(loss(_reference(p)), argnums=(1, 2, 3, 4))(x64[i], *params64)
        for name, got, ref in zip(("A", "B", "bias", "lora_B_bias"), per_sample, expected):
            assert got.shape == (B_SAMPLES, *ref.shape), name
            assert ref.abs().sum() > 0 and rel_err(got[i], ref) < FP32, (name, i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_jvp_and_jacrev_match_float64(nf4, device):
    p = _problem(nf4, device)
    args, args64 = _args(p), _args(p, torch.float64)
    tangents = tuple(torch.randn(a.shape, generator=torch.Generator().manual_seed(i)).to(a)
                     for i, a in enumerate(args))
    y, dy = jvp(_ours(p, nf4), args, tangents)
    y64, dy64 = jvp(_reference(p), args64, tuple(t.double() for t in tangents))
    assert rel_err(y, y64) < FP32 and rel_err(dy, dy64) < FP32
    jac = jacrev(_ours(p, nf4), argnums=(0, 1))(args[0][0, 0], *args[1:])
    jac64 = jacrev(_reference(p), argnums=(0, 1))(args64[0][0, 0], *args64[1:])
    assert jac[0].shape == (N, K) and jac[1].shape == (N, R, K)
    for got, ref in zip(jac, jac64):
        assert rel_err(got, ref) < FP32


def test_dropout_under_vmap_follows_the_randomness_flag():
    p = _problem(False, "cpu")
    same_x = p["x"][:1].expand(B_SAMPLES, T, K)  # every sample identical: only the masks can differ
    forward = vmap(_ours(p, False, dropout_p=0.5), in_dims=(0, None, None, None, None), randomness="different")
    y = forward(same_x, *_args(p)[1:])
    assert not torch.equal(y[0], y[1])
    forward = vmap(_ours(p, False, dropout_p=0.5), in_dims=(0, None, None, None, None), randomness="same")
    y = forward(same_x, *_args(p)[1:])
    assert all(torch.equal(y[0], y[i]) for i in range(1, B_SAMPLES))
    no_dropout = _ours(p, False)(same_x[0], *_args(p)[1:])
    assert not torch.equal(y[0], no_dropout)  # a mask was applied
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(_ours(p, False, dropout_p=0.5), in_dims=(0, None, None, None, None))(same_x, *_args(p)[1:])


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_second_derivatives_match_float64(nf4):
    # The eager layer is differentiable once; under torch.func, hessian works (the composite route).
    p = _problem(nf4, "cpu")

    def loss(forward):
        return lambda A, x, B, bias, lora_B_bias: forward(x, A, B, bias, lora_B_bias).square().sum()

    x, A, B, bias, lora_B_bias = _args(p)
    hess = torch.func.hessian(loss(_ours(p, nf4)))(A, x[0, :1], B, bias, lora_B_bias)
    x64, A64, B64, bias64, lora_B_bias64 = _args(p, torch.float64)
    hess64 = torch.func.hessian(loss(_reference(p)))(A64, x64[0, :1], B64, bias64, lora_B_bias64)
    assert hess.shape == (R, K, R, K) and hess64.abs().sum() > 0
    assert rel_err(hess, hess64) < FP32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_forward_mode_ad_dual_tensors_match_float64(nf4, requires_grad, backend, monkeypatch):
    """torch.autograd.forward_ad outside torch.func: dual inputs take the composite route (the kernels
    would drop the tangent; the autograd function has no jvp), with or without reverse-mode grads."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", backend)
    p = _problem(nf4, "cpu")
    args, args64 = _args(p), _args(p, torch.float64)
    tangent = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(9))
    A = args[1].clone().requires_grad_(requires_grad)
    with fwAD.dual_level():
        y = _ours(p, nf4, dropout_p=0.0)(fwAD.make_dual(args[0], tangent), A, *args[2:])
        y, dy = fwAD.unpack_dual(y)
    _, dy64 = jvp(_reference(p), args64, (tangent.double(),) + tuple(torch.zeros_like(a) for a in args64[1:]))
    assert dy is not None and rel_err(dy, dy64) < FP32
    assert rel_err(y, _reference(p)(*args64)) < FP32
    with fwAD.dual_level():  # dropout: the tangent goes through the same mask
        torch.manual_seed(3)
        dual = lora_kernels.seeded_dropout(fwAD.make_dual(args[0], tangent), 0.5)
        out, d_out = fwAD.unpack_dual(dual)
    assert d_out is not None and torch.equal(d_out == 0, out == 0) and torch.equal(d_out, tangent * (out / args[0]))


# ---------------------------------------------------------------------------------------------
# 16-bit x beside fp32 adapters (the composite route's mixed-dtype branch: the LoRA term summed in
# fp32 and rounded once), and dropout under the transforms against float64 with the same keep mask
# ---------------------------------------------------------------------------------------------
def _in_dtypes(p, nf4, x_dtype):
    """_problem's values with x, the base weight (an NF4 weight: stored in x_dtype) and bias in x_dtype,
    the adapters and lora_B_bias fp32 (PEFT's autocast_adapter_dtype)."""
    W = p["dense"].to(x_dtype)
    p = dict(p, x=p["x"].to(x_dtype), bias=p["bias"].to(x_dtype))
    p["weight"] = NF4Weight.quantize(W) if nf4 else W
    p["dense"] = (p["weight"].dequantize().to(x_dtype) if nf4 else W).double()
    return p


def _dropout_reference(p, keep, dropout_p):
    def forward(x, A, B, bias, lora_B_bias):
        return lora_linear_reference(x, p["dense"], A, B, SCALE, bias=bias, lora_B_bias=lora_B_bias,
                                     keep_mask=keep, dropout_p=dropout_p)
    return forward


def _composite_spy(monkeypatch):
    """Records (x's dtype, lora_A's dtype, dropout seed given) of each call of the composite forward."""
    import lora_kernels.ops.lora_linear as dense_ops
    calls, real = [], dense_ops.composite_lora_forward

    def spy(x2, weight, lora_A, *args):
        calls.append((x2.dtype, lora_A.dtype, args[-1] is not None))
        return real(x2, weight, lora_A, *args)
    monkeypatch.setattr(dense_ops, "composite_lora_forward", spy)
    return calls


def _check_transforms(forward, reference64, args, bound, reseed=lambda: None):
    """jvp (all inputs), vjp and grad of ``forward`` against ``reference64`` on float64 copies; each
    transform runs after ``reseed()`` (the same dropout seed every time). Returns the float64 y."""
    args64 = tuple(a.double() for a in args)
    gen = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(a.shape, generator=gen).to(a.dtype) for a in args)
    cotangent = torch.randn(B_SAMPLES, T, N, generator=gen).to(args[0].dtype).float()  # exact in x's dtype
    reseed()
    y, dy = jvp(forward, args, tangents)
    y64, dy64 = jvp(reference64, args64, tuple(t.double() for t in tangents))
    assert y.dtype == args[0].dtype and dy.dtype == args[0].dtype
    assert_close(y, y64, bound, "y (jvp)")
    assert_close(dy, dy64, bound, "dy (jvp)")
    reseed()
    y, pullback = vjp(forward, *args)
    grads = pullback(cotangent.to(y.dtype))
    _, pullback64 = vjp(reference64, *args64)
    grads64 = pullback64(cotangent.double())
    assert_close(y, y64, bound, "y (vjp)")
    names = ("x", "A", "B", "bias", "lora_B_bias")
    for name, a, got, ref in zip(names, args, grads, grads64):
        assert got.dtype == a.dtype, name
        assert_close(got, ref, bound, f"d{name} (vjp)")
    reseed()
    grads = grad(lambda *a: (forward(*a).float() * cotangent).sum(), argnums=(0, 1, 2, 3, 4))(*args)
    for name, a, got, ref in zip(names, args, grads, grads64):
        assert got.dtype == a.dtype, name
        assert_close(got, ref, bound, f"d{name} (grad)")
    return y64


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_half_x_with_fp32_adapters_matches_float64(monkeypatch, nf4, x_dtype):
    calls = _composite_spy(monkeypatch)
    p = _in_dtypes(_problem(nf4, "cpu"), nf4, x_dtype)
    args = _args(p)
    assert args[0].dtype == x_dtype and args[1].dtype == args[2].dtype == torch.float32
    _check_transforms(_ours(p, nf4), _reference(p), args, BOUNDS[x_dtype])
    # per-sample gradients of the fp32 adapters from 16-bit samples (vmap over x)
    per_sample = vmap(grad(lambda x, A, B: (_ours(p, nf4)(x, A, B, *args[3:]).float() * p["cotangent"]).sum(),
                           argnums=(1, 2)), in_dims=(0, None, None))(*args[:3])
    x64, *params64 = _args(p, torch.float64)
    for i in range(B_SAMPLES):
        expected = grad(lambda x, A, B: (_reference(p)(x, A, B, *params64[2:]) * p["cotangent"].double()).sum(),
                        argnums=(1, 2))(x64[i], *params64[:2])
        for name, got, ref in zip(("A", "B"), per_sample, expected):
            assert got.dtype == torch.float32
            assert_close(got[i], ref, BOUNDS[x_dtype], f"per-sample d{name} [{i}]")
    assert calls and set(calls) == {(x_dtype, torch.float32, False)}  # the mixed-dtype composite route


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_dropout_under_transforms_matches_float64_with_the_same_mask(monkeypatch, nf4, x_dtype):
    # Each transform draws its seed from torch's RNG like an eager call: after torch.manual_seed(s) the
    # mask is keep_mask_for(s, ...), which the float64 reference applies (times 1 / (1 - p)). Adapters
    # fp32 (16-bit x: the mixed-dtype branch).
    dropout_p, s = 0.3, 77
    calls = _composite_spy(monkeypatch)
    p = _problem(nf4, "cpu")
    if x_dtype != torch.float32:
        p = _in_dtypes(p, nf4, x_dtype)
    args = _args(p)
    keep = keep_mask_for(s, B_SAMPLES * T, K, dropout_p, "cpu").view(B_SAMPLES, T, K)
    bound = FP32 if x_dtype == torch.float32 else BOUNDS[x_dtype]
    y64 = _check_transforms(_ours(p, nf4, dropout_p), _dropout_reference(p, keep, dropout_p), args, bound,
                         reseed=lambda: torch.manual_seed(s))
    assert calls and set(calls) == {(x_dtype, torch.float32, True)}
    # the mask matters: the reference without dropout, or with another seed's mask, is far off
    args64 = _args(p, torch.float64)
    other = keep_mask_for(s + 1, B_SAMPLES * T, K, dropout_p, "cpu").view(keep.shape)
    for ref in (_reference(p), _dropout_reference(p, other, dropout_p)):
        assert rel_err(ref(*args64), y64) > 10 * bound
