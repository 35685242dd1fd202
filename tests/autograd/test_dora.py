"""``lora_kernels.dora_linear`` (DoRA on the fused kernels) against a float64 reference of the DoRA
formula, dense and NF4 base weights, every backend, with and without dropout (the reference applies
the same seeded mask); the row norms without W + s B A; the norm cache; argument errors."""
import copy
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.autograd.dora import dora_weight_norm, row_sqnorm
from tests.helpers import BOUNDS, FLOAT_DTYPES, LAYOUTS, assert_close, bnb_dequantized, keep_mask_for, make_x

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture
def torch_backend_env(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")

K, N, R, SCALE = 64, 24, 4, 0.75


def _problem(device, dtype=torch.float32, nf4=False, lead=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, div=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) / div).to(device, dt)

    W = rand(N, K, div=8)
    q = NF4Weight.quantize(W.cpu()) if nf4 else None
    weight = q.to(device) if nf4 else W
    # the weight the layer computes with, as bitsandbytes decodes it (not the decode under test)
    dense = (bnb_dequantized(q).to(device) if nf4 else W).to(dtype)
    leaves = dict(x=rand(*lead, K), lora_A=rand(R, K, div=8, dt=torch.float32),
                  lora_B=rand(N, R, dt=torch.float32), magnitude=rand(N, dt=torch.float32).abs() + 0.5,
                  bias=rand(N))
    for t in leaves.values():
        t.requires_grad_(True)
    return weight, dense, leaves


def _dora_reference(pb, grad_y=None, keep=None, p=0.0, absolute=False):
    """float64 (y, grads by name) of y = (x - d(x)) W^T + g (d(x) W^T + s d(x) A^T B^T) + b, g = m / ||W + s B A||
    (detached; PEFT's y = x W^T + b + (g - 1) d(x) W^T + g s d(x) A^T B^T), from pb's leaves (view:
    ``make_x``'s, or None) upcast; grads None without grad_y. absolute: the same sums of |terms|
    (|inputs|, |grad_y|, |g|, |1 - keep / (1 - p)|): the magnitudes for the cancellation floor."""
    t64 = {k: v.detach().cpu().double() for k, v in pb["leaves"].items()}  # leaves on the backend's device
    W, scale = pb["dense"].double(), pb["scale"]
    norm = torch.linalg.norm(W + scale * t64["lora_B"] @ t64["lora_A"], dim=1)
    if absolute:
        t64, W = {k: v.abs() for k, v in t64.items()}, W.abs()
    for v in t64.values():
        v.requires_grad_(True)
    x = pb["view"](t64["x"]) if pb.get("view") else t64["x"]
    kept = torch.ones_like(x) if keep is None else keep.view(x.shape).double() / (1 - p)
    rest = 1 - kept  # the base term of the dropped-out elements (0 without dropout)
    g = t64["magnitude"] / norm
    if absolute:
        g, kept, rest = g.abs(), kept.abs(), rest.abs()
    d = x * kept
    y = (x * rest) @ W.t() + g * (d @ W.t() + scale * (d @ t64["lora_A"].t()) @ t64["lora_B"].t())
    if "bias" in t64:
        y = y + t64["bias"]
    if grad_y is None:
        return y.detach(), None
    y.backward(grad_y.double().abs() if absolute else grad_y.double())
    return y.detach(), {k: v.grad for k, v in t64.items()}


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_matches_float64(backend, nf4, dropout_p):
    weight, dense, t = _problem(backend.device, nf4=nf4)
    torch.manual_seed(21)
    y = lora_kernels.dora_linear(t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], SCALE, bias=t["bias"],
                                 dropout_p=dropout_p)
    keep = keep_mask_for(21, 15, K, dropout_p, device=backend.device).cpu() if dropout_p else None
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y64, grads64 = _dora_reference(dict(leaves=t, dense=dense.cpu(), scale=SCALE), grad_y, keep, dropout_p)
    assert y.shape == (3, 5, N) and y.dtype == torch.float32
    assert_close(y, y64, BOUNDS[torch.float32], "y")
    y.backward(grad_y.to(y.device))
    for name in t:
        assert t[name].grad.abs().sum() > 0, name
        assert_close(t[name].grad, grads64[name], BOUNDS[torch.float32], f"d{name}")
    assert backend.impls("fwd")  # the fused layer ran on this backend


def test_bf16_x_with_fp32_adapters_and_out_dtype(torch_backend_env):
    weight, dense, t = _problem("cpu", dtype=torch.bfloat16)
    args = (t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], SCALE)
    y = lora_kernels.dora_linear(*args, bias=t["bias"])
    y32 = lora_kernels.dora_linear(*args, bias=t["bias"], out_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    y64, _ = _dora_reference(dict(leaves=t, dense=dense, scale=SCALE))
    assert_close(y, y64, BOUNDS[torch.bfloat16], "bf16")
    assert_close(y32, y64, BOUNDS[torch.bfloat16], "fp32 out")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_weight_norm_without_the_sum_matches_float64(torch_backend_env, nf4):
    weight, dense, t = _problem("cpu", nf4=nf4)
    A, B = t["lora_A"].detach(), t["lora_B"].detach()
    expected = torch.linalg.norm(dense.double() + SCALE * B.double() @ A.double(), dim=1)
    assert_close(dora_weight_norm(weight, A, B, SCALE), expected, 1e-6, "norm")
    bf16 = dense.bfloat16()
    assert_close(dora_weight_norm(bf16, A, B, SCALE),
                 torch.linalg.norm(bf16.double() + SCALE * B.double() @ A.double(), dim=1), 2e-3, "bf16 weight")


def test_row_norm_cache_follows_the_weight(torch_backend_env):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    cache = {}
    first = row_sqnorm(W, cache)
    assert row_sqnorm(W, cache) is first  # reused
    assert_close(first, W.double().square().sum(1), 1e-6, "||W_n||^2")
    with torch.no_grad():
        W.mul_(3)  # in place: the version counter moves
    tripled = row_sqnorm(W, cache)
    assert_close(tripled, 9 * first, 1e-6, "recomputed")
    other = W.clone()  # another storage, same values: recomputed, and the cache now follows it
    assert row_sqnorm(other, cache) is not tripled and cache[other.device][0][0]() is other.untyped_storage()
    # Another storage at the same address, version and layout (as a new weight allocated where a
    # freed one was, e.g. after model.half().float()): recomputed, not taken for the old one.
    again = row_sqnorm(other, cache)
    alias = torch.from_numpy(other.numpy())
    assert alias.data_ptr() == other.data_ptr() and alias._version == other._version
    assert row_sqnorm(alias, cache) is not again
    # A copied cache (deepcopy / pickle of a model) matches no storage, the original's neither.
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        stale = copied[alias.device][1]
        assert row_sqnorm(alias, copied) is not stale
    square = torch.randn(K, K, generator=torch.Generator().manual_seed(2))
    row_sqnorm(square, cache)  # a transposed view (a Conv1D's weight as [N, K]): same storage and shape
    assert_close(row_sqnorm(square.t(), cache), square.double().square().sum(0), 1e-6, "||W^T_n||^2")


def test_row_norm_cache_keeps_one_entry_per_device_read_at_once(torch_backend_env):
    """nn.DataParallel's replicas share their module's __dict__ (so the cache) and run in threads, one
    per GPU: another replica may store its value between this one's lookups. Played here in one
    thread: the "other replica" is the same weight on the meta device, stored right after the lookup."""
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    other_replica = W.to("meta")

    class OtherReplicaStoresAfterALookup(dict):
        armed = False

        def get(self, *args):
            found = super().get(*args)
            if self.armed:
                self.armed = False
                row_sqnorm(other_replica, self)
            return found

    cache = OtherReplicaStoresAfterALookup()
    first = row_sqnorm(W, cache)
    cache.armed = True
    again = row_sqnorm(W, cache)
    assert again is first and again.device == W.device
    assert set(cache) == {W.device, other_replica.device}
    assert row_sqnorm(other_replica, cache).device == other_replica.device
    # the entry of a weight that is gone (as after model.to(another device)) goes with the next store
    cache = {}
    row_sqnorm(torch.randn(N, K), cache)
    row_sqnorm(other_replica, cache)
    assert set(cache) == {other_replica.device}


def test_bad_arguments(torch_backend_env):
    weight, _, t = _problem("cpu")
    x, A, B, m = t["x"], t["lora_A"], t["lora_B"], t["magnitude"]
    with pytest.raises(ValueError, match="magnitude"):
        lora_kernels.dora_linear(x, weight, A, B, m[:-1], SCALE)
    with pytest.raises(TypeError, match="magnitude"):
        lora_kernels.dora_linear(x, weight, A, B, None, SCALE)
    with pytest.raises(ValueError, match="bias"):
        lora_kernels.dora_linear(x, weight, A, B, m, SCALE, bias=t["bias"][:-1])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_kernels.dora_linear(x, weight, A, B, m, SCALE, dropout_p=1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_kernels.dora_linear(x, weight, A[:, :-1], B, m, SCALE)
    with pytest.raises(TypeError, match="weight"):
        lora_kernels.dora_linear(x, None, A, B, m, SCALE)
    with pytest.raises(ValueError, match="weight"):
        lora_kernels.dora_linear(x, weight[0], A, B, m, SCALE)
    for out_dtype in (torch.bool, torch.int32, "float16"):
        with pytest.raises(TypeError, match="out_dtype"):
            lora_kernels.dora_linear(x, weight, A, B, m, SCALE, out_dtype=out_dtype)
    with pytest.raises(TypeError, match="norm_cache"):
        lora_kernels.dora_linear(x, weight, A, B, m, SCALE, norm_cache=[])


# ---------------------------------------------------------------------------------------------
# Shapes, ranks and dtypes: hypothesis over M = 0, 1, odd, 3-D and non-contiguous x, ranks up to 128,
# fp32 / fp16 / bf16 x with adapters in x's dtype or fp32, dropout, on every backend
# ---------------------------------------------------------------------------------------------
@st.composite
def dora_specs(draw):
    lead = draw(st.one_of(st.sampled_from([(0,), (1,), (2, 0), (2, 3, 5)]), st.tuples(st.integers(2, 45)),
                          st.tuples(st.integers(1, 4), st.integers(1, 11))))
    x_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return dict(lead=lead, K=draw(st.integers(8, 48)), N=draw(st.integers(1, 40)),
                r=draw(st.one_of(st.integers(1, 16), st.integers(17, 128))), x_dtype=x_dtype,
                adapter_dtype=draw(st.sampled_from([x_dtype, torch.float32])), layout=draw(st.sampled_from(LAYOUTS)),
                bias=draw(st.booleans()), dropout_p=draw(st.sampled_from([0.0, 0.3])), seed=draw(st.integers(0, 2**20)))


def _spec(lead, K, N, r, x_dtype, adapter_dtype, layout, bias, dropout_p, seed=0):
    return dict(lead=lead, K=K, N=N, r=r, x_dtype=x_dtype, adapter_dtype=adapter_dtype, layout=layout, bias=bias,
                dropout_p=dropout_p, seed=seed)


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=dora_specs())
# explicit cases: empty; one row; 3-D transposed bf16 beside fp32 adapters at rank 128 with dropout;
# odd M > 16 (the Triton GEMMs past their small-M form), row-strided x, fp16 adapters
@example(spec=_spec((0,), 24, 10, 3, torch.float32, torch.float32, "contiguous", True, 0.3))
@example(spec=_spec((1,), 37, 19, 5, torch.float16, torch.float16, "sliced", True, 0.0))
@example(spec=_spec((2, 3, 5), 33, 21, 128, torch.bfloat16, torch.float32, "transposed", False, 0.3, seed=1))
@example(spec=_spec((37,), 45, 29, 70, torch.float16, torch.float16, "row_strided", True, 0.3, seed=2))
def test_any_shape_rank_and_dtype_against_float64(backend, spec):
    lead, K, N, r, x_dtype, adapter_dtype = (spec[k] for k in ("lead", "K", "N", "r", "x_dtype", "adapter_dtype"))
    p, seed = spec["dropout_p"], spec["seed"]
    g = torch.Generator().manual_seed(seed)
    x_leaf, view = make_x(lead, K, x_dtype, spec["layout"], g, backend.device)
    dense = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(backend.device, x_dtype)
    leaves = dict(x=x_leaf, lora_A=torch.randn(r, K, generator=g) / math.sqrt(K), lora_B=torch.randn(N, r, generator=g),
                  magnitude=torch.rand(N, generator=g) + 0.5)
    leaves = {k: v.to(backend.device, x_dtype if k == "x" else adapter_dtype) for k, v in leaves.items()}
    if spec["bias"]:
        leaves["bias"] = torch.randn(N, generator=g).to(backend.device, x_dtype)
    for t in leaves.values():
        t.requires_grad_(True)
    pb = dict(leaves=leaves, view=view, dense=dense.cpu(), scale=float(0.5 + torch.rand((), generator=g)))
    x = view(x_leaf)
    M = math.prod(lead)
    backend.clear()
    torch.manual_seed(seed)
    y = lora_kernels.dora_linear(x, dense, leaves["lora_A"], leaves["lora_B"], leaves["magnitude"], pb["scale"],
                                 bias=leaves.get("bias"), dropout_p=p)
    assert y.shape == (*lead, N) and y.dtype == x_dtype
    grad_y = torch.randn(y.shape, generator=g).to(backend.device, x_dtype)
    y.backward(grad_y)
    keep = keep_mask_for(seed, M, K, p, device=backend.device).cpu() if p else None
    y64, grads64 = _dora_reference(pb, grad_y.cpu(), keep, p)
    mag_y, mag_grads = _dora_reference(pb, grad_y.cpu(), keep, p, absolute=True)
    bound = BOUNDS[x_dtype]
    assert_close(y, y64, bound, "y", mag_y)
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close(t.grad, grads64[name], bound, f"d{name}", mag_grads[name])
    expected = backend.expected_impl(M, N, K, r)  # the fused LoRA GEMMs on this backend
    assert backend.impls("fwd") == [expected] and backend.impls("bwd") == [expected]


# ---------------------------------------------------------------------------------------------
# ||W_n||^2 a row chunk at a time: several chunks, a partial last one (NF4 and dense weights)
# ---------------------------------------------------------------------------------------------
def _row_chunks(q):
    """The (n0, n1) row chunks the PyTorch path decodes the NF4 weight q in."""
    from lora_kernels.ops.reference import nf4_row_chunks
    from lora_kernels.ops.nf4 import NF4Tensors
    return list(nf4_row_chunks(NF4Tensors.of(q)))


@pytest.mark.parametrize("double_quant", [False, True])
def test_row_sqnorm_over_several_chunks(monkeypatch, double_quant):
    from lora_kernels.autograd import dora as dora_module
    from lora_kernels.ops import reference as torch_path
    n, k = 37, 64
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) / 8
    q = NF4Weight.quantize(W.bfloat16(), double_quant=double_quant)
    monkeypatch.setattr(torch_path, "NF4_CHUNK_ELEMENTS", 8 * k)  # 8 rows a chunk: 5 chunks, the last of 5 rows
    monkeypatch.setattr(dora_module, "_SQNORM_CHUNK_ELEMENTS", 8 * k)
    chunks = _row_chunks(q)
    assert len(chunks) == 5 and chunks[-1] == (32, 37)
    assert_close(row_sqnorm(q), q.dequantize().double().square().sum(1), 1e-6, "NF4 ||W_n||^2")
    assert_close(row_sqnorm(W), W.double().square().sum(1), 1e-6, "dense ||W_n||^2")
    assert_close(row_sqnorm(W.t().contiguous().t()), W.double().square().sum(1), 1e-6, "column-major dense")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_nf4_dora_over_several_row_chunks_matches_float64(monkeypatch, dropout_p):
    # The PyTorch path decodes the NF4 weight in row chunks for ||W_n||^2, x W^T and dY W: several here.
    from lora_kernels.ops import reference as torch_path
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    monkeypatch.setattr(torch_path, "NF4_CHUNK_ELEMENTS", 5 * K)  # 5 rows a chunk: 4 of 5 rows, one of 4
    weight, dense, t = _problem("cpu", nf4=True)
    assert len(_row_chunks(weight)) == 5
    torch.manual_seed(21)
    y = lora_kernels.dora_linear(t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], SCALE, bias=t["bias"],
                                 dropout_p=dropout_p)
    keep = keep_mask_for(21, 15, K, dropout_p, device="cpu") if dropout_p else None
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y64, grads64 = _dora_reference(dict(leaves=t, dense=dense, scale=SCALE), grad_y, keep, dropout_p)
    assert_close(y, y64, BOUNDS[torch.float32], "y")
    y.backward(grad_y)
    for name in t:
        assert_close(t[name].grad, grads64[name], BOUNDS[torch.float32], f"d{name}")
