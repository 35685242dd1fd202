"""``lora_kernels.dora_linear`` (DoRA on the fused kernels) against a float64 reference of the DoRA
formula, dense and NF4 base weights, every backend, with and without dropout (the reference applies
the same seeded mask); the row norms without W + s B A; the norm cache; argument errors."""
import copy
import pickle

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight
from lora_kernels.autograd.dora import dora_weight_norm, row_sqnorm
from tests.helpers import BOUNDS, assert_close, keep_mask_for

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
    weight = NF4Weight.quantize(W.cpu()).to(device) if nf4 else W
    dense = (weight.dequantize() if nf4 else W).to(dtype)  # the weight the layer computes with
    leaves = dict(x=rand(*lead, K), lora_A=rand(R, K, div=8, dt=torch.float32),
                  lora_B=rand(N, R, dt=torch.float32), magnitude=rand(N, dt=torch.float32).abs() + 0.5,
                  bias=rand(N))
    for t in leaves.values():
        t.requires_grad_(True)
    return weight, dense, leaves


def _reference(dense, t, keep=None, p=0.0):
    """float64 y = W x + b + (g - 1) W d(x) + g s B A d(x) (PEFT's form), g = m / ||W + s B A|| detached."""
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    W = dense.double()
    x = t64["x"]
    d = x if keep is None else x * keep.view(x.shape) / (1 - p)
    norm = torch.linalg.norm(W + SCALE * t64["lora_B"].detach() @ t64["lora_A"].detach(), dim=1)
    g = t64["magnitude"] / norm
    y = x @ W.t() + t64["bias"] + (g - 1) * (d @ W.t()) + g * SCALE * (d @ t64["lora_A"].t() @ t64["lora_B"].t())
    return y, t64


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_matches_float64(backend, nf4, dropout_p):
    weight, dense, t = _problem(backend.device, nf4=nf4)
    torch.manual_seed(21)
    y = lora_kernels.dora_linear(t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], SCALE, bias=t["bias"],
                                 dropout_p=dropout_p)
    keep = keep_mask_for(21, 15, K, dropout_p, device=backend.device).cpu() if dropout_p else None
    y64, t64 = _reference(dense.cpu(), {k: v.cpu() for k, v in t.items()}, keep, dropout_p)
    assert y.shape == (3, 5, N) and y.dtype == torch.float32
    assert_close(y, y64, BOUNDS[torch.float32], "y")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(grad_y.to(y.device))
    y64.backward(grad_y.double())
    for name in t:
        assert t[name].grad.abs().sum() > 0, name
        assert_close(t[name].grad, t64[name].grad, BOUNDS[torch.float32], f"d{name}")
    assert backend.impls("fwd")  # the fused layer ran on this backend


def test_bf16_x_with_fp32_adapters_and_out_dtype(torch_backend_env):
    weight, dense, t = _problem("cpu", dtype=torch.bfloat16)
    args = (t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], SCALE)
    y = lora_kernels.dora_linear(*args, bias=t["bias"])
    y32 = lora_kernels.dora_linear(*args, bias=t["bias"], out_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    y64, _ = _reference(dense, t)
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
    assert row_sqnorm(other, cache) is not tripled and cache["key"][0]() is other.untyped_storage()
    # Another storage at the same address, version and layout (as a new weight allocated where a
    # freed one was, e.g. after model.half().float()): recomputed, not taken for the old one.
    again = row_sqnorm(other, cache)
    alias = torch.from_numpy(other.numpy())
    assert alias.data_ptr() == other.data_ptr() and alias._version == other._version
    assert row_sqnorm(alias, cache) is not again
    # A copied cache (deepcopy / pickle of a model) matches no storage, the original's neither.
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        stale = copied["value"]
        assert row_sqnorm(alias, copied) is not stale
    square = torch.randn(K, K, generator=torch.Generator().manual_seed(2))
    row_sqnorm(square, cache)  # a transposed view (a Conv1D's weight as [N, K]): same storage and shape
    assert_close(row_sqnorm(square.t(), cache), square.double().square().sum(0), 1e-6, "||W^T_n||^2")


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
