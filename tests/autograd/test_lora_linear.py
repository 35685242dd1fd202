"""The public ``lora_kernels.lora_linear``: forward and every gradient against the float64
reference (hypothesis over shapes, dtypes, layouts, biases, dropout) on both CPU backends,
PEFT ``lora.Linear`` equality, dropout semantics, LoRA-FA saving rules, need flags, determinism,
torch.compile, and argument errors."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lora_kernels
from lora_kernels.kernels.configs import MAX_RANK
from tests.helpers import (BOUNDS, BWD_NEED_FLAGS, DTYPE_IDS, LAYOUTS, SEED_HIGH, assert_close,
                           check_against_reference, keep_mask_for, make_grad_y, make_problem, reference,
                           rel_err, rng_state, run_public, use_backend)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (x dtype, adapter dtype): adapters in x's dtype, or fp32 beside 16-bit x (PEFT's autocast_adapter_dtype)
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)]


pytestmark = pytest.mark.usefixtures("poisoned")


def _run_and_check(backend, pb, grad_y, dropout_p=0.0, rng_seed=1234, training=True):
    """Run lora_linear (forward + backward), check against the float64 reference with the mask
    regenerated from the seed lora_linear drew, and check which implementation ran."""
    backend.clear()
    torch.manual_seed(rng_seed)
    y, grads = run_public(pb, grad_y, dropout_p=dropout_p, training=training)
    active = dropout_p > 0 and training
    keep = keep_mask_for(rng_seed, pb.M, pb.x.shape[-1], dropout_p) if active else None
    ref_y, ref_grads = reference(pb, grad_y, keep, dropout_p if active else 0.0)
    # hypothesis draws tiny K and N, where a sum can cancel to nearly nothing
    magnitudes = reference(pb, grad_y, keep, dropout_p if active else 0.0, absolute=True)
    check_against_reference(pb, y, grads, ref_y, ref_grads, BOUNDS[pb.x_leaf.dtype], magnitudes)
    N, K, r = pb.weight.shape[0], pb.weight.shape[1], pb.lora_A.shape[0]
    expected = backend.expected_impl(pb.M, N, K, r)
    assert backend.impls("fwd") == [expected]
    assert backend.impls("bwd") == ([expected] if grads else [])
    return y, grads


# ---------------------------------------------------------------------------------------------
# Property test: forward + all gradients vs float64
# ---------------------------------------------------------------------------------------------
@st.composite
def problem_specs(draw):
    m = st.one_of(st.just(0), st.just(1), st.integers(2, 70))
    if draw(st.booleans()):
        lead = (draw(m),)
    else:
        lead = (draw(st.integers(0, 3)), draw(st.one_of(st.just(1), st.integers(0, 23))))
    x_dtype, adapter_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    return dict(
        lead=lead,
        K=draw(st.one_of(st.just(1), st.integers(1, 70))),
        N=draw(st.one_of(st.just(1), st.integers(1, 70))),
        r=draw(st.one_of(st.integers(1, 16), st.integers(17, 128))),
        x_dtype=x_dtype, adapter_dtype=adapter_dtype,
        bias=draw(st.booleans()), lora_B_bias=draw(st.booleans()),
        bias_dtype=draw(st.sampled_from([None, F32])),
        layout=draw(st.sampled_from(LAYOUTS)),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.15, 0.5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=45, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=problem_specs())
def test_matches_float64_reference(backend, spec):
    run_drawn_spec(backend, spec)


def run_drawn_spec(backend, spec):
    """Builds the problem a drawn ``spec`` describes (``make_problem``'s arguments plus dropout_p and
    seed) and checks forward and gradients against float64."""
    spec = dict(spec)
    p, seed = spec.pop("dropout_p"), spec.pop("seed")
    lead, K, N, r = spec.pop("lead"), spec.pop("K"), spec.pop("N"), spec.pop("r")
    pb = make_problem(lead, K, N, r, spec.pop("x_dtype"), spec.pop("adapter_dtype"), seed=seed, **spec)
    _run_and_check(backend, pb, make_grad_y(pb, seed + 1), dropout_p=p, rng_seed=seed)


# ---------------------------------------------------------------------------------------------
# Explicit cases: layouts and 3-D, dtypes, ranks, empty problems
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead", [(37,), (2, 9), (3, 1, 7)], ids=lambda l: "x".join(map(str, l)))
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32)], ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_layouts_and_leading_dims(backend, layout, lead, dtypes):
    pb = make_problem(lead, 37, 29, 8, *dtypes, bias=True, lora_B_bias=True, layout=layout, seed=11)
    if layout != "contiguous" and len(lead) <= 2:
        assert not pb.x.is_contiguous()
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.3)


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F32)],
                         ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_large_m_cublas_base_route(backend, monkeypatch, dtypes):
    # M >= LORA_KERNELS_DENSE_CUBLAS_MIN_M: the base products x W^T and dY W on cuBLAS, the LoRA terms,
    # dropout mask and biases from the GEMM kernels' epilogues (empty K / N loops); 3-D and
    # transposed x; below the threshold, the fused GEMMs
    if backend.name == "torch":
        pytest.skip("a route of the Triton backend")
    from lora_kernels.ops import triton_launch
    routes = []
    for name in ("_cublas_base_forward", "_cublas_base_grad_input"):
        real = getattr(triton_launch, name)
        monkeypatch.setattr(triton_launch, name, lambda *a, real=real, name=name: (routes.append(name), real(*a))[1])
    monkeypatch.setenv(triton_launch.DENSE_CUBLAS_MIN_M_ENV, "30")
    for layout in ("contiguous", "transposed"):
        pb = make_problem((3, 11), 72, 40, 8, *dtypes, bias=True, lora_B_bias=True, layout=layout, seed=31)
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert routes == ["_cublas_base_forward", "_cublas_base_grad_input"] * 2
    routes.clear()
    pb = make_problem((29,), 72, 40, 8, *dtypes, bias=True, seed=32)
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert routes == []


def _in_layout(t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A leaf like t (dtype, device, requires_grad) in an odd memory layout: "transposed" (2-D,
    column-major), "strided" (every other element of the last dim; the gaps hold other random
    values) or "expanded" (1-D, stride 0: one value repeated). Values random (the reference reads them)."""
    shape = tuple(t.shape)
    if layout == "transposed":
        view = torch.randn(shape[::-1], generator=gen).t()
    elif layout == "strided":
        view = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    else:
        view = torch.randn(1, generator=gen).expand(shape)
    assert not view.is_contiguous()
    return view.to(device=t.device, dtype=t.dtype).detach().requires_grad_(t.requires_grad)


PARAMETER_LAYOUTS = [("weight", "transposed"), ("weight", "strided"), ("lora_A", "transposed"),
                     ("lora_A", "strided"), ("lora_B", "transposed"), ("lora_B", "strided"), ("bias", "strided"),
                     ("bias", "expanded"), ("lora_B_bias", "strided"), ("lora_B_bias", "expanded")]


@pytest.mark.parametrize("name, layout", PARAMETER_LAYOUTS, ids=[f"{n}-{lay}" for n, lay in PARAMETER_LAYOUTS])
def test_parameter_layouts(backend, name, layout):
    # Views users pass as parameters: a tied or transposed weight, a bias sliced from a fused one, an
    # expanded bias. The Triton forward read a strided or expanded bias at unit stride (silently
    # wrong, NaN for stride 0).
    # lora_B_bias only where it is the tensor under test: otherwise bias joins it in a new fp32 tensor
    pb = make_problem((3, 7), 37, 29, 8, bias=True, lora_B_bias=name == "lora_B_bias", seed=13)
    setattr(pb, name, _in_layout(getattr(pb, name), layout, torch.Generator().manual_seed(14)))
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.3)


@pytest.mark.parametrize("x_dtype", [F16, BF16])
@pytest.mark.parametrize("bias_dtype", [None, F32])
def test_fp32_adapters_with_half_x(backend, x_dtype, bias_dtype):
    pb = make_problem((5, 13), 45, 38, 12, x_dtype, F32, bias=True, lora_B_bias=True, bias_dtype=bias_dtype,
                      seed=3)
    y, grads = _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    # output in x's dtype, each gradient in its parameter's dtype
    assert y.dtype == x_dtype
    assert grads["x"].dtype == x_dtype
    assert grads["lora_A"].dtype == grads["lora_B"].dtype == grads["lora_B_bias"].dtype == F32
    assert grads["bias"].dtype == (bias_dtype or x_dtype)


@pytest.mark.parametrize("r", [1, 200, 256, MAX_RANK + 1, 300])
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F16), (BF16, F32)],
                         ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_large_and_tiny_ranks(backend, r, dtypes):
    # r <= 256 runs the kernels (padded rank 256 is the largest); r > 256 takes the torch path.
    pb = make_problem((6,), 9, 7, r, *dtypes, bias=True, lora_B_bias=True, seed=r)
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.25)
    if r > MAX_RANK:
        assert set(backend.impls()) == {"torch"}


@pytest.mark.parametrize("lead", [(0,), (4, 0), (0, 3)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("x_dtype", [F32, BF16])
def test_zero_rows(backend, lead, dropout_p, x_dtype):
    K, N, r = 10, 6, 3
    pb = make_problem(lead, K, N, r, x_dtype, bias=True, lora_B_bias=True, seed=5)
    y, grads = _run_and_check(backend, pb, make_grad_y(pb), dropout_p=dropout_p)
    assert y.shape == (*lead, N)
    assert grads["x"].shape == pb.x_leaf.shape
    # gradients of the parameters are sums over zero rows: exact zeros of the right shape and dtype
    for name, shape in (("lora_A", (r, K)), ("lora_B", (N, r)), ("bias", (N,)), ("lora_B_bias", (N,))):
        assert grads[name].shape == shape and torch.equal(grads[name], torch.zeros_like(grads[name])), name
    # also through .sum().backward() (a grad_y that is not a given tensor)
    pb.zero_grad()
    lora_kernels.lora_linear(pb.x, pb.weight, pb.lora_A, pb.lora_B, pb.scale, bias=pb.bias).sum().backward()
    assert pb.lora_A.grad.shape == (r, K) and not pb.lora_A.grad.any()


@pytest.mark.parametrize("shape", [(5, 0, 4), (5, 7, 0)], ids=["K0", "N0"])
def test_empty_features(backend, shape):
    # K = 0 (y = bias + scale * lora_B_bias) and N = 0 (empty output) take the torch path.
    M, K, N = shape
    pb = make_problem((M,), K, N, 3, F32, bias=True, lora_B_bias=True, seed=1)
    backend.clear()
    y, grads = run_public(pb, make_grad_y(pb))
    ref_y, ref_grads = reference(pb, make_grad_y(pb))
    check_against_reference(pb, y, grads, ref_y, ref_grads, BOUNDS[F32])
    assert set(backend.impls()) == {"torch"}


# ---------------------------------------------------------------------------------------------
# Large M on the lean PyTorch path: its backward forms dA and dB differently above some M
# (reference._grad_lora_B: (h^T dY)^T above GRAD_B_DIRECT_MAX_M rows; reference._mm_tn: a batched
# GEMM over 4 M-chunks plus a sum from M = 1024, M % 4 == 0, contiguous operands), shapes the other
# tests never reach. Small K, N, r keep it cheap; 1030 is not a multiple of 4 (the plain product).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_fa", [False, True], ids=["A_trained", "lora_fa"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32), (F16, F16)],
                         ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
@pytest.mark.parametrize("lead", [(257,), (1024,), (4, 257), (1030,)], ids=lambda l: "x".join(map(str, l)))
def test_large_m_torch_backward_matches_float64(monkeypatch, lead, dtypes, dropout_p, lora_fa):
    from lora_kernels.ops import reference as torch_path

    M = math.prod(lead)
    products = []  # (function, rows, whether it ran the M-split batched GEMM: torch.bmm)
    bmm_calls, bmm = [], torch.bmm

    def counting_bmm(*args, **kwargs):
        bmm_calls.append(1)
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counting_bmm)

    def spy(name, fn):
        def wrapper(a, b, *args):
            before = len(bmm_calls)
            out = fn(a, b, *args)
            products.append((name, a.shape[0], len(bmm_calls) > before))
            return out
        return wrapper

    for name in ("_mm_tn", "_grad_lora_B"):
        monkeypatch.setattr(torch_path, name, spy(name, getattr(torch_path, name)))
    rg = ("x", "lora_B", "bias", "lora_B_bias") if lora_fa else ("x", "lora_A", "lora_B", "bias", "lora_B_bias")
    with use_backend("torch") as record:
        pb = make_problem(lead, 24, 20, 6, *dtypes, bias=True, lora_B_bias=not lora_fa, seed=M + 7,
                          requires_grad=rg)
        _, grads = _run_and_check(record, pb, make_grad_y(pb, seed=M), dropout_p=dropout_p, rng_seed=M)
    assert ("lora_A" in grads) != lora_fa
    # the branches under test ran: dB from the large-M form, dA (trained A) from the split GEMM
    split = M >= 1024 and M % 4 == 0
    assert ("_grad_lora_B", M, split) in products
    assert any(s for _, _, s in products) == split, products
    if not lora_fa:
        assert ("_mm_tn", M, split) in products


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("M", [3, 300])  # both forms of reference._grad_lora_B (GRAD_B_DIRECT_MAX_M)
@pytest.mark.parametrize("scale", [2.0, 1 / 3])
def test_fp16_grad_b_does_not_overflow_where_the_true_value_is_finite(backend, M, scale):
    """dB = scale * dY^T h in fp16 with every true value finite, built so that the wrong place for
    the scale overflows: with scale 2, h ~ 40000 (scale * h > 65504: the scale must go on the
    product); with scale 1/3, dY^T h ~ 90000 (the scale must go first). A non-finite dB would make
    torch.amp.GradScaler skip the step; PEFT's autograd (dY scaled first) stays finite in both."""
    g = torch.Generator().manual_seed(M)

    def uniform(shape, low, high):
        return (low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64))

    K, N, r = 8, 4, 2
    if scale > 1:
        x, A, grad_y = uniform((M, K), 90, 110), uniform((r, K), 45, 55), uniform((M, N), 1e-3, 2e-3)
    else:
        x, A, grad_y = uniform((M, K), 0.9, 1.1), uniform((r, K), 2.3, 2.7), uniform((M, N), 1e3, 2e3) * 3 / M
    W, B = uniform((N, K), 0, 1e-3), uniform((N, r), 0, 1e-4)
    x16, W16, A16, grad_y16 = (t.to(F16) for t in (x, W, A, grad_y))
    B16 = B.to(F16).requires_grad_(True)
    with use_backend(backend) as record:
        lora_kernels.lora_linear(x16, W16, A16, B16, scale).backward(grad_y16)
    assert record.impl == backend
    h = x16.double() @ A16.double().t()
    ref = scale * grad_y16.double().t() @ h
    assert ref.abs().max() < 6e4  # the true dB is finite in fp16
    assert B16.grad.isfinite().all(), B16.grad
    assert_close(B16.grad, ref, BOUNDS[F16], "dB")


# ---------------------------------------------------------------------------------------------
# PEFT equality
# ---------------------------------------------------------------------------------------------
def _peft_layer(K, N, r, alpha, dtype, lora_bias, use_rslora, gen):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from lora_kernels.integrations.peft import build_peft_layer
    base = torch.nn.Linear(K, N, bias=True).to(dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, lora_bias=lora_bias, use_rslora=use_rslora)
    layer = build_peft_layer(PeftLinear, base, config, r=r, lora_alpha=alpha)
    with torch.no_grad():  # fresh random tensors everywhere; lora_B random, not PEFT's zero init
        base.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
        base.bias.copy_(torch.randn(N, generator=gen))
        layer.lora_A["default"].weight.copy_(torch.randn(r, K, generator=gen) / math.sqrt(K))
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=gen) / math.sqrt(r))
        if lora_bias:
            layer.lora_B["default"].bias.copy_(torch.randn(N, generator=gen))
    base.weight.requires_grad_(False)  # PEFT freezes the base weight; the base bias stays trainable here
    return layer


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_linear(backend, dtype, lora_bias, use_rslora):
    K, N, r, alpha = 40, 33, 6, 16
    gen = torch.Generator().manual_seed(17)
    layer = _peft_layer(K, N, r, alpha, dtype, lora_bias, use_rslora, gen).to(backend.device)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype in (dtype, F32)
    assert B.abs().min() > 0  # really random, not zero-initialised
    scale = layer.scaling["default"]
    assert scale == pytest.approx(alpha / math.sqrt(r) if use_rslora else alpha / r)
    x = torch.randn(3, 7, K, generator=gen).to(backend.device, dtype).requires_grad_(True)
    grad_y = torch.randn(3, 7, N, generator=gen).to(backend.device, dtype)

    # reference: the PEFT layer itself in float64, on the same tensors upcast
    layer64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = layer64(x64)
    y64.backward(grad_y.double())
    lb64 = layer64.lora_B["default"].bias
    ref = {"x": x64.grad, "lora_A": layer64.lora_A["default"].weight.grad,
           "lora_B": layer64.lora_B["default"].weight.grad, "bias": layer64.base_layer.bias.grad}
    if lora_bias:
        ref["lora_B_bias"] = lb64.grad
    # the float64 spec is PEFT's semantics
    spec = lora_kernels.ops.lora_linear_reference(
        x64.detach(), layer64.base_layer.weight, layer64.lora_A["default"].weight.detach(),
        layer64.lora_B["default"].weight.detach(), scale, bias=layer64.base_layer.bias.detach(),
        lora_B_bias=lb64.detach() if lora_bias else None)
    assert rel_err(spec, y64) < 1e-12

    lora_B_bias = layer.lora_B["default"].bias
    y = lora_kernels.lora_linear(x, layer.base_layer.weight, A, B, scale, bias=layer.base_layer.bias,
                                 lora_B_bias=lora_B_bias)
    y.backward(grad_y)
    got = {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad, "bias": layer.base_layer.bias.grad}
    if lora_bias:
        got["lora_B_bias"] = lora_B_bias.grad
    bound = BOUNDS[dtype]
    assert y.dtype == dtype
    assert_close(y, y64, bound, "y")
    for name in ref:
        assert_close(got[name], ref[name], bound, f"d{name}")
    assert backend.impls() == [backend.impl] * 2


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F32)], ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_dropout_same_mask_forward_and_backward(backend, p, dtypes):
    pb = make_problem((3, 11), 50, 24, 7, *dtypes, bias=True, seed=21)
    grad_y = make_grad_y(pb)
    y, grads = _run_and_check(backend, pb, grad_y, dropout_p=p, rng_seed=99)
    # The check can fail: a different mask (another seed) or no mask is far off.
    bound = BOUNDS[dtypes[0]]
    for keep in (keep_mask_for(100, pb.M, 50, p), None):
        ref_y, ref_grads = reference(pb, grad_y, keep, p if keep is not None else 0.0)
        assert rel_err(y, ref_y) > 10 * bound
        assert rel_err(grads["lora_A"], ref_grads["lora_A"]) > 10 * bound
        assert rel_err(grads["x"], ref_grads["x"]) > 10 * bound


def test_fp16_backward_scales_before_the_rank_products(backend):
    # A loss scaler's large dY with scale < 1: dY B (and dY^T h) alone exceed fp16's 65504, scale * dY B
    # does not, and PEFT's backward (which scales dY first) stays finite. Positive values: no cancelling.
    M, K, N, r, scale = 8, 16, 8, 4, 0.25
    gen = torch.Generator().manual_seed(5)

    def around(value, *shape):
        return value * (1 + 0.1 * torch.rand(*shape, generator=gen))

    x, A, B = around(0.25, M, K), around(0.25, r, K), around(1.0, N, r)
    weight, grad_y = torch.randn(N, K, generator=gen) / 100, around(9000.0, M, N)
    assert float((grad_y @ B).max()) > 65504 > scale * float((grad_y @ B).max())
    leaves = [t.to(backend.device, torch.float16).requires_grad_(True) for t in (x, A, B)]
    y = lora_kernels.lora_linear(leaves[0], weight.to(backend.device, torch.float16), leaves[1], leaves[2], scale)
    y.backward(grad_y.to(backend.device, torch.float16))
    ref = [t.double().requires_grad_(True) for t in (x, A, B)]
    (ref[0] @ weight.double().t() + scale * (ref[0] @ ref[1].t()) @ ref[2].t()).backward(grad_y.double())
    for name, leaf, expected in zip(("dx", "dA", "dB"), leaves, ref):
        assert float(expected.grad.abs().max()) < 65504, name
        assert_close(leaf.grad, expected.grad, BOUNDS[F16], name)


@pytest.mark.parametrize("nan_in", ["x_dropped", "x_kept", "lora_A", "lora_B"])
def test_dropout_propagates_nan_as_pytorch_does(backend, nan_in):
    # PyTorch's dropout is x * mask / (1 - p): a NaN in a dropped element still makes NaN (0 * NaN),
    # in h and so in dB (and dA). A select (where(keep, x, 0)) would hide it.
    M, K, N, r, p = 8, 32, 16, 4, 0.5
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(M, K, generator=gen)
    weight = torch.randn(N, K, generator=gen) / math.sqrt(K)
    A, B = torch.randn(r, K, generator=gen) / math.sqrt(K), torch.randn(N, r, generator=gen)
    keep = keep_mask_for(31, M, K, p, backend.device).cpu()  # the seed comes from the generator of x's device
    where = {"x_dropped": (x, tuple((~keep).nonzero()[0].tolist())), "x_kept": (x, tuple(keep.nonzero()[0].tolist())),
             "lora_A": (A, (1, 5)), "lora_B": (B, (3, 2))}[nan_in]
    where[0][where[1]] = math.nan
    leaves = [t.to(backend.device, copy=True).requires_grad_(True) for t in (x, A, B)]
    torch.manual_seed(31)
    y = lora_kernels.lora_linear(leaves[0], weight.to(backend.device), leaves[1], leaves[2], 0.5, dropout_p=p)
    y.backward(torch.ones_like(y))
    ref = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    y_ref = ref[0] @ weight.double().t() + 0.5 * ((ref[0] * keep / (1 - p)) @ ref[1].t()) @ ref[2].t()
    y_ref.backward(torch.ones_like(y_ref))
    for name, got, expected in zip(("y", "dx", "dA", "dB"), (y, *(t.grad for t in leaves)),
                                   (y_ref, *(t.grad for t in ref))):
        if backend.impl == "triton" and (name, nan_in[:4]) in (("dx", "lora"), ("dA", "x_dr")):
            # the Triton dX and dA kernels (interpreted, or compiled for "cuda") select where dropped
            # (a multiply spills registers): NaN there becomes 0, a subset of the reference's NaNs
            assert not (got.isnan().cpu() & ~expected.isnan()).any(), name
            continue
        assert torch.equal(got.isnan().cpu(), expected.isnan()), name
    assert backend.impls() == [backend.impl] * 2


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(backend, p):
    # x = 1, A = B = I, scale = 1: y - x W^T = dropout(1) = keep / (1 - p) elementwise.
    M = K = N = 64  # r = K: A = B = I
    gen = torch.Generator().manual_seed(8)
    x = torch.ones(M, K, device=backend.device)
    weight = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(backend.device)
    eye = torch.eye(K, device=backend.device)
    torch.manual_seed(2024)
    y = lora_kernels.lora_linear(x, weight, eye, eye, 1.0, dropout_p=p)
    lora = y.double() - x.double() @ weight.double().t()
    kept = lora > 0.5 / (1 - p)
    expected = torch.where(kept, 1.0 / (1 - p), 0.0).double()
    assert (lora - expected).abs().max() < 1e-4
    assert torch.equal(kept, keep_mask_for(2024, M, K, p))
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel()), rate
    assert backend.impls() == [backend.impl]


@pytest.mark.parametrize("how", ["training=False", "p=0"])
def test_no_dropout_draws_nothing(backend, how):
    pb = make_problem((4, 6), 30, 20, 5, F32, bias=True, lora_B_bias=True, seed=4)
    kwargs = {"dropout_p": 0.4, "training": False} if how == "training=False" else {"dropout_p": 0.0}
    state = rng_state(pb.x_leaf.device)  # the generator a seed for x's device comes from
    y, grads = run_public(pb, make_grad_y(pb), **kwargs)
    assert torch.equal(rng_state(pb.x_leaf.device), state)
    y0, grads0 = run_public(pb, make_grad_y(pb))
    assert torch.equal(y, y0) and all(torch.equal(grads[k], grads0[k]) for k in grads)
    ref_y, ref_grads = reference(pb, make_grad_y(pb))
    check_against_reference(pb, y, grads, ref_y, ref_grads, BOUNDS[F32])
    # while active dropout does draw its seed from torch's RNG
    run_public(pb, None, dropout_p=0.4)
    assert not torch.equal(rng_state(pb.x_leaf.device), state)


def test_dropout_reproducible_under_manual_seed(backend):
    pb = make_problem((20,), 40, 30, 6, F32, seed=6)
    grad_y = make_grad_y(pb)
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        y, grads = run_public(pb, grad_y, dropout_p=0.3)
        runs.append((y, {k: g.clone() for k, g in grads.items()}))
    (y1, g1), (y2, g2), (y3, g3) = runs
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(y1, y3) and not torch.equal(g1["lora_A"], g3["lora_A"])
    # consecutive calls without reseeding draw fresh masks
    torch.manual_seed(5)
    ya = run_public(pb, None, dropout_p=0.3)[0]
    yb = run_public(pb, None, dropout_p=0.3)[0]
    assert torch.equal(ya, y1) and not torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------
# Saving rules (LoRA-FA) and need flags
# ---------------------------------------------------------------------------------------------
def _saved_tensors(pb, dropout_p):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(31)
        y = lora_kernels.lora_linear(pb.x, pb.weight, pb.lora_A, pb.lora_B, pb.scale, bias=pb.bias,
                                     dropout_p=dropout_p)
    return y, saved


def _same(a, b):
    return a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32), (F16, F16)],
                         ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_lora_fa_saves_only_h(backend, dropout_p, x_grad, dtypes):
    lead, K, N, r = (3, 8), 36, 22, 5
    rg = ("bias", "lora_B") + (("x",) if x_grad else ())
    pb = make_problem(lead, K, N, r, *dtypes, bias=True, seed=9, requires_grad=rg)
    assert not pb.lora_A.requires_grad
    y, saved = _saved_tensors(pb, dropout_p)
    params = (pb.weight, pb.lora_A, pb.lora_B)
    others = [t for t in saved if not any(_same(t, p) for p in params)]
    assert not any(_same(t, pb.x) or t.data_ptr() == pb.x.data_ptr() for t in saved), "x must not be saved"
    hs = [t for t in others if t.dtype != torch.int64]
    seeds = [t for t in others if t.dtype == torch.int64]
    assert len(hs) == 1 and hs[0].shape == (24, r) and hs[0].dtype == dtypes[1]
    # the seed (8 bytes) is kept only if a backward needs the mask: dX here (dA is frozen)
    if dropout_p > 0 and x_grad:
        assert len(seeds) == 1 and seeds[0].shape == (1,)
        assert 0 <= seeds[0].item() < SEED_HIGH
    else:
        assert seeds == []
    # h is dropout(x) A^T with the forward's mask
    keep = keep_mask_for(31, 24, K, dropout_p) if dropout_p else None
    x2 = pb.x.detach().double().reshape(-1, K)
    if keep is not None:
        x2 = x2 * keep.double() / (1 - dropout_p)
    assert_close(hs[0], x2 @ pb.lora_A.double().t(), BOUNDS[dtypes[0]], "h")
    # and the backward from those saved tensors is right
    grad_y = make_grad_y(pb)
    y.backward(grad_y)
    ref_y, ref_grads = reference(pb, grad_y, keep, dropout_p)
    grads = {k: v.grad for k, v in pb.params().items()}
    check_against_reference(pb, y, grads, ref_y, ref_grads, BOUNDS[dtypes[0]])
    assert pb.lora_A.grad is None


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_trainable_lora_A_saves_x(backend, dropout_p):
    pb = make_problem((2, 7), 20, 12, 4, F32, seed=10)
    _, saved = _saved_tensors(pb, dropout_p)
    assert any(_same(t, pb.x) for t in saved), "x must be saved for dA"
    assert sum(t.dtype == torch.int64 for t in saved) == (1 if dropout_p else 0)
    assert sum(t.shape == (14, 4) and t.data_ptr() != pb.lora_A.data_ptr() for t in saved) == 1  # h for dB


def test_frozen_lora_B_saves_no_h(backend):
    pb = make_problem((9,), 20, 12, 4, F32, seed=12, requires_grad=("x", "lora_A"))
    _, saved = _saved_tensors(pb, 0.0)
    params = (pb.weight, pb.lora_A, pb.lora_B)
    assert [tuple(t.shape) for t in saved if not any(_same(t, p) for p in params)] == [(9, 20)]  # x only


@pytest.mark.parametrize("trainable", [("lora_A", "lora_B"), ("x",), ("lora_B",), ("bias",),
                                       ("x", "bias"), ("lora_A",), ("lora_B_bias",),
                                       ("x", "lora_A", "lora_B", "bias", "lora_B_bias")],
                         ids=lambda t: "+".join(t))
def test_need_flags_follow_requires_grad(backend, trainable):
    pb = make_problem((2, 9), 26, 18, 5, F32, bias=True, lora_B_bias=True, seed=13, requires_grad=trainable)
    _, grads = _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert set(grads) == set(trainable)
    for name in {"x", "lora_A", "lora_B", "bias", "lora_B_bias"} - set(trainable):
        t = pb.x_leaf if name == "x" else getattr(pb, name)
        assert t.grad is None, name
    need = backend.calls[-1][2][BWD_NEED_FLAGS]
    expected = ("x" in trainable, "lora_A" in trainable, "lora_B" in trainable,
                "bias" in trainable or "lora_B_bias" in trainable)
    assert tuple(need) == expected


def test_weight_requiring_grad_is_rejected(backend):
    pb = make_problem((4,), 8, 6, 2, F32, bias=True, seed=14)
    pb.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="^weight "):
        run_public(pb, None)
    # under no_grad nothing is trained, so it is allowed
    with torch.no_grad():
        y = lora_kernels.lora_linear(pb.x, pb.weight, pb.lora_A, pb.lora_B, pb.scale, bias=pb.bias)
    assert not y.requires_grad
    pb.weight.requires_grad_(False)
    assert_close(y, reference(pb, None)[0], BOUNDS[F32], "y")


# ---------------------------------------------------------------------------------------------
# Determinism and torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F32)],
                         ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_backward_is_deterministic(backend, dtypes):
    # M large enough for several M-splits (fixed-order reductions of partials)
    pb = make_problem((150,), 40, 300, 20, *dtypes, bias=True, lora_B_bias=True, seed=15)
    grad_y = make_grad_y(pb)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        y, grads = run_public(pb, grad_y, dropout_p=0.1)
        runs.append((y, {k: g.clone() for k, g in grads.items()}))
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def _compile_case(backend_name, dropout_p, compile_backend):
    pb = make_problem((2, 5), 24, 16, 4, F32, bias=True, lora_B_bias=True, seed=16)
    grad_y = make_grad_y(pb)

    def step(x, lora_A, lora_B, bias, lora_B_bias):
        y = lora_kernels.lora_linear(x, pb.weight, lora_A, lora_B, pb.scale, bias=bias,
                                     lora_B_bias=lora_B_bias, dropout_p=dropout_p)
        return y * 1.5 + 0.25  # surrounding ops get traced too

    leaves = (pb.lora_A, pb.lora_B, pb.bias, pb.lora_B_bias)
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (compiled, step):
        pb.zero_grad()
        torch.manual_seed(7)
        y = fn(pb.view(pb.x_leaf), *leaves)
        y.backward(grad_y)
        results.append((y.detach(), {k: v.grad.clone() for k, v in pb.params().items()}))
    (yc, gc), (ye, ge) = results
    keep = keep_mask_for(7, pb.M, 24, dropout_p) if dropout_p else None
    ref_y, ref_grads = reference(pb, grad_y * 1.5, keep, dropout_p)
    assert_close(yc, ref_y * 1.5 + 0.25, BOUNDS[F32], "compiled y")
    for k in ref_grads:
        assert_close(gc[k], ref_grads[k], BOUNDS[F32], f"compiled d{k}")
    return (yc, gc), (ye, ge)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_torch_compile_fullgraph_aot_eager(backend, dropout_p):
    torch._dynamo.reset()
    (yc, gc), (ye, ge) = _compile_case(backend.name, dropout_p, "aot_eager")
    # aot_eager runs the same ops as eager, including the seed draw: bit-identical
    assert torch.equal(yc, ye)
    for k in gc:
        assert torch.equal(gc[k], ge[k]), k
    assert set(backend.impls()) == {backend.impl}


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_torch_compile_fullgraph_inductor(backend, dropout_p):
    # Inductor generates its own RNG for randint unless fallback_random is set; with it, the seed
    # (and so the dropout mask) is the one eager draws.
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        (yc, gc), (ye, ge) = _compile_case(backend.name, dropout_p, "inductor")
    assert_close(yc, ye.double(), BOUNDS[F32], "compiled vs eager y")
    for k in gc:
        assert_close(gc[k], ge[k].double(), BOUNDS[F32], f"compiled vs eager d{k}")


# ---------------------------------------------------------------------------------------------
# Argument errors: the message starts with the argument's name
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    K, N, r = 8, 6, 2
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, K, generator=g), torch.randn(N, K, generator=g)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    b = torch.randn(N, generator=g)
    meta = lambda t: t.to("meta")  # noqa: E731
    V, T = ValueError, TypeError
    return {
        "x K mismatch": (dict(x=torch.randn(5, K + 1)), V, "x"),
        "x 0-d": (dict(x=torch.tensor(1.0)), V, "x"),
        "lora_A K mismatch": (dict(lora_A=torch.randn(r, K - 1)), V, "lora_A"),
        "lora_A 1-d": (dict(lora_A=torch.randn(K)), V, "lora_A"),
        "lora_B wrong r": (dict(lora_B=torch.randn(N, r + 1)), V, "lora_B"),
        "lora_B wrong N": (dict(lora_B=torch.randn(N + 1, r)), V, "lora_B"),
        "lora_B transposed": (dict(lora_B=torch.randn(r, N)), V, "lora_B"),
        "weight 1-d": (dict(weight=torch.randn(K)), V, "weight"),
        "bias shape": (dict(bias=torch.randn(N + 1)), V, "bias"),
        "bias 2-d": (dict(bias=torch.randn(1, N)), V, "bias"),
        "lora_B_bias shape": (dict(lora_B_bias=torch.randn(N - 1)), V, "lora_B_bias"),
        "r = 0": (dict(lora_A=torch.randn(0, K), lora_B=torch.randn(N, 0)), V, "lora_A"),
        "weight on meta": (dict(weight=meta(W)), V, "weight"),
        "lora_A on meta": (dict(lora_A=meta(A)), V, "lora_A"),
        "lora_B on meta": (dict(lora_B=meta(B)), V, "lora_B"),
        "bias on meta": (dict(bias=meta(b)), V, "bias"),
        "lora_B_bias on meta": (dict(lora_B_bias=meta(b)), V, "lora_B_bias"),
        "x on meta": (dict(x=meta(x)), V, "weight"),  # everything else is then on the wrong device
        "weight fp16 with fp32 x": (dict(weight=W.half()), V, "weight"),
        "weight fp64": (dict(weight=W.double()), T, "weight"),
        "fp16 adapters with bf16 x": (dict(x=x.bfloat16(), weight=W.bfloat16(), lora_A=A.half(),
                                           lora_B=B.half()), V, "lora_A"),
        "lora_B dtype != lora_A": (dict(lora_B=B.half()), V, "lora_B"),
        "bias fp16 with bf16 x": (dict(x=x.bfloat16(), weight=W.bfloat16(), bias=b.half()), V, "bias"),
        "lora_B_bias dtype": (dict(lora_B_bias=b.half()), V, "lora_B_bias"),
        "dropout_p = 1": (dict(dropout_p=1.0), V, "dropout_p"),
        "dropout_p < 0": (dict(dropout_p=-0.1), V, "dropout_p"),
        "dropout_p nan": (dict(dropout_p=float("nan")), V, "dropout_p"),
        "dropout_p str": (dict(dropout_p="0.1"), T, "dropout_p"),
        "dropout_p None": (dict(dropout_p=None), T, "dropout_p"),
        "x int": (dict(x=x.long()), T, "x"),
        "weight int": (dict(weight=W.int()), T, "weight"),
        "lora_A int": (dict(lora_A=A.long()), T, "lora_A"),
        "lora_B bool": (dict(lora_B=B > 0), T, "lora_B"),
        "bias int": (dict(bias=b.long()), T, "bias"),
        "x not a tensor": (dict(x=x.tolist()), T, "x"),
        "scale str": (dict(scale="2"), T, "scale"),
        "scale None": (dict(scale=None), T, "scale"),
        "scale bool": (dict(scale=True), T, "scale"),
        "scale tensor": (dict(scale=torch.tensor(2.0)), T, "scale"),
        "scale inf": (dict(scale=math.inf), V, "scale"),
        "scale nan": (dict(scale=math.nan), V, "scale"),
    }, dict(x=x, weight=W, lora_A=A, lora_B=B, scale=2.0, bias=b, lora_B_bias=b.clone(), dropout_p=0.0)


_CASES, _GOOD = _bad_cases()


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_arguments_raise_naming_the_argument(case):
    override, exc, name = _CASES[case]
    args = {**_GOOD, **override}
    with pytest.raises(exc, match=rf"^{name} "):
        lora_kernels.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["scale"],
                                 bias=args["bias"], lora_B_bias=args["lora_B_bias"], dropout_p=args["dropout_p"])


def test_good_arguments_pass():
    # The baseline of the error cases is valid (so each error comes from its one change), and
    # integer scales / numpy floats are accepted as real numbers.
    import numpy as np
    for scale in (2.0, 2, np.float32(2.0)):
        y = lora_kernels.lora_linear(_GOOD["x"], _GOOD["weight"], _GOOD["lora_A"], _GOOD["lora_B"], scale,
                                     bias=_GOOD["bias"], lora_B_bias=_GOOD["lora_B_bias"])
        assert y.shape == (5, 6)
