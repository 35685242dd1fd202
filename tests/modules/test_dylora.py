"""DyLoRA layers: any active rank on views of the r_max adapters (no copies), scale alpha/r (or
alpha/sqrt(r)), rank sampling in training, the frozen mode, NF4 base weights; float64 references."""
import math

import pytest
import torch

from lora_kernels import DyLoRALinear, NF4DyLoRALinear, dylora_sample_rank, dylora_set_rank
from lora_kernels.modules import LoRALinear
from tests.helpers import rel_err

K, N, R_MAX, ALPHA = 64, 24, 8, 16.0
FP32 = 1e-5


def _layer(cls=DyLoRALinear, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = cls(K, N, R_MAX, ALPHA, **kwargs)
    with torch.no_grad():  # B random: PEFT's zero init would hide the LoRA term
        layer.lora_B.copy_(torch.randn(N, R_MAX, generator=torch.Generator().manual_seed(seed + 1)))
    return layer


def _x(seed=3, lead=(2, 5)):
    return torch.randn(*lead, K, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _weight(layer):
    return layer.qweight.dequantize() if hasattr(layer, "qweight") else layer.weight


def _reference(layer, x, r, scale):
    """float64 output and gradients of x W^T + b + scale x A[:r]^T B[:, :r]^T."""
    x64 = x.detach().double().requires_grad_(True)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    y = x64 @ _weight(layer).double().t() + layer.bias.double() + scale * (x64 @ A[:r].t()) @ B[:, :r].t()
    return y, x64, A, B


@pytest.mark.parametrize("cls", [DyLoRALinear, NF4DyLoRALinear])
@pytest.mark.parametrize("r", [1, 3, R_MAX])
@pytest.mark.parametrize("rslora", [False, True])
def test_truncated_rank_matches_plain_lora(backend, cls, r, rslora):
    layer = _layer(cls, use_rslora=rslora)
    layer.rank = r
    scale = ALPHA / (math.sqrt(r) if rslora else r)
    assert layer.scale == pytest.approx(scale)
    x = _x()
    y = layer(x)
    y_ref, x64, A, B = _reference(layer, x, r, scale)
    assert rel_err(y, y_ref) < FP32
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(g)
    y_ref.backward(g.double())
    assert rel_err(x.grad, x64.grad) < FP32
    assert rel_err(layer.lora_A.grad[:r], A.grad[:r]) < FP32
    assert rel_err(layer.lora_B.grad[:, :r], B.grad[:, :r]) < FP32
    # outside the active rank: exactly zero
    assert not layer.lora_A.grad[r:].any() and not layer.lora_B.grad[:, r:].any()
    if cls is DyLoRALinear:  # the same function as a plain LoRALinear holding the truncated matrices
        plain = LoRALinear(K, N, r, ALPHA, use_rslora=rslora)
        with torch.no_grad():
            plain.weight.copy_(layer.weight)
            plain.bias.copy_(layer.bias)
            plain.lora_A.copy_(layer.lora_A[:r])
            plain.lora_B.copy_(layer.lora_B[:, :r])
        assert rel_err(plain(x), y_ref) < FP32 and rel_err(y, plain(x).double()) < FP32


def test_frozen_mode_updates_only_the_last_active_rank(backend):
    layer = _layer(frozen=True)
    layer.rank = 5
    x = _x()
    y = layer(x)
    y_ref, _, A, B = _reference(layer, x, 5, ALPHA / 5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(g)
    y_ref.backward(g.double())
    assert not layer.lora_A.grad[:4].any() and not layer.lora_A.grad[5:].any()
    assert not layer.lora_B.grad[:, :4].any() and not layer.lora_B.grad[:, 5:].any()
    assert rel_err(layer.lora_A.grad[4], A.grad[4]) < FP32
    assert rel_err(layer.lora_B.grad[:, 4], B.grad[:, 4]) < FP32


def test_training_samples_ranks_in_range_and_eval_uses_r_max(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    layer = _layer(r_min=3)
    x = _x()
    with torch.no_grad():
        outputs = {r: _reference(layer, x, r, ALPHA / r)[0] for r in range(1, R_MAX + 1)}
        torch.manual_seed(0)
        seen = []
        for _ in range(40):
            y = layer(x).double()
            seen.append(min(outputs, key=lambda r: float((outputs[r] - y).norm())))
            assert rel_err(y, outputs[seen[-1]]) < FP32
        assert set(seen) == set(range(3, R_MAX + 1))  # every rank of [r_min, r_max], nothing else
        layer.eval()
        assert rel_err(layer(x), outputs[R_MAX]) < FP32


def test_one_rank_per_step_for_the_whole_model(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    model = torch.nn.Sequential(_layer(seed=0, r_min=2), torch.nn.ReLU(), DyLoRALinear(N, K, R_MAX, ALPHA, r_min=2))
    ranks = {dylora_sample_rank(model, torch.Generator().manual_seed(s)) for s in range(30)}
    assert ranks == set(range(2, R_MAX + 1))
    assert model[0].rank == model[2].rank
    assert dylora_set_rank(model, None) == 2 and model[0].rank is None
    with pytest.raises(ValueError, match="different"):
        dylora_sample_rank(torch.nn.Sequential(_layer(r_min=1), _layer(r_min=2)))
    with pytest.raises(ValueError, match="no DyLoRA"):
        dylora_set_rank(torch.nn.Linear(2, 2), 1)
    # a rank one layer refuses changes no layer (all checked first)
    model[0].rank = 3
    small = DyLoRALinear(K, N, 2, ALPHA)
    with pytest.raises(ValueError, match="r_max = 2"):
        dylora_set_rank(torch.nn.Sequential(model, small), 4)
    assert (model[0].rank, model[2].rank, small.rank) == (3, None, None)
    model[2].rank = 3
    model[2].merge()
    with pytest.raises(ValueError, match="merged"):
        dylora_sample_rank(model, torch.Generator().manual_seed(1))
    assert (model[0].rank, model[2].rank) == (3, 3)


def test_merge_uses_the_fixed_rank(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    layer = _layer()
    layer.rank = 4
    x = _x()
    expect = _reference(layer, x, 4, ALPHA / 4)[0]
    layer.merge()
    assert rel_err(layer(x), expect) < FP32
    with pytest.raises(ValueError, match="merged"):
        layer.rank = 2
    assert "scale=4," in repr(layer)  # the active rank's: alpha / 4, not alpha / r_max
    layer.unmerge()
    layer.rank = 2
    assert rel_err(layer(x), _reference(layer, x, 2, ALPHA / 2)[0]) < FP32


def test_views_are_not_copies():
    layer = _layer()
    layer.rank = 3
    A, B, _ = layer._adapters()
    assert A.data_ptr() == layer.lora_A.data_ptr() and B.data_ptr() == layer.lora_B.data_ptr()
    assert B.stride() == layer.lora_B.stride()  # a strided view of B's first columns


def test_bad_arguments():
    with pytest.raises(ValueError, match="r_min"):
        DyLoRALinear(K, N, 4, ALPHA, r_min=5)
    with pytest.raises(ValueError, match="r_min"):
        DyLoRALinear(K, N, 4, ALPHA, r_min=0)
    with pytest.raises(TypeError, match="frozen"):
        DyLoRALinear(K, N, 4, ALPHA, frozen=1)
    layer = _layer()
    with pytest.raises(ValueError, match="r_max"):
        layer.rank = R_MAX + 1
    with pytest.raises(ValueError, match="rank"):
        layer.rank = 0
    with pytest.raises(TypeError, match="rank"):
        layer.rank = 2.5
    with pytest.raises(ValueError, match="alpha"):
        layer.scale = 3.0
    with pytest.raises(TypeError, match="model"):
        dylora_set_rank("model", 2)
    for r, exc in ((0, ValueError), (R_MAX + 1, ValueError), (2.0, TypeError)):
        with pytest.raises(exc, match="r must"):
            layer.scale_for_rank(r)
    assert layer.scale_for_rank(2) == ALPHA / 2
    with pytest.raises(TypeError, match="generator"):
        dylora_sample_rank(layer, generator="seed")


def test_from_linear_shares_the_base_weight(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N)
    layer = DyLoRALinear.from_linear(linear, R_MAX, ALPHA, r_min=2, frozen=True)
    assert layer.weight.data_ptr() == linear.weight.data_ptr() and layer.r_min == 2 and layer.frozen
    q = NF4DyLoRALinear.from_linear(linear, R_MAX, ALPHA, r_min=2)
    assert q.r_max == R_MAX and q.qweight.shape == (N, K)
    x = _x()
    q.eval()
    with torch.no_grad():  # B = 0 after PEFT-style init: the base layer alone (NF4-rounded)
        assert rel_err(q(x), x.double() @ q.qweight.dequantize().double().t() + linear.bias.double()) < FP32


# ---------------------------------------------------------------------------------------------
# Shapes: odd sizes, M = 0 and 1, 3-D and non-contiguous inputs, ranks up to 128
# ---------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 70), n=st.integers(1, 50), r_max=st.integers(1, 128), data=st.data(),
       lead=st.sampled_from([(0,), (1,), (3,), (2, 5), (1, 1, 7)]), strided=st.booleans(),
       use_rslora=st.booleans())
def test_any_shape_and_rank_against_float64(monkeypatch, k, n, r_max, data, lead, strided, use_rslora):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    rank = data.draw(st.integers(1, r_max), label="rank")
    torch.manual_seed(r_max)
    layer = DyLoRALinear(k, n, r_max, 2.0 * r_max, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(k * 131 + n)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(n, r_max, generator=g))
    layer.rank = rank
    x_full = torch.randn(*lead, 2 * k if strided else k, generator=g)
    x = (x_full[..., ::2] if strided else x_full).requires_grad_(True)  # every other column: non-contiguous
    y = layer(x)
    assert y.shape == (*lead, n)
    scale = 2.0 * r_max / (math.sqrt(rank) if use_rslora else rank)
    y_ref, x64, A, B = _reference(layer, x, rank, scale)
    if y.numel() == 0:
        return
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    y_ref.backward(dy.double())
    # The same computation on absolute values: every output and gradient becomes the sum of the
    # magnitudes of its terms. fp32 rounding error is bounded relative to that, not to the result,
    # which cancellation can make arbitrarily small (e.g. N = 1, one row).
    xa = x.detach().double().abs().requires_grad_(True)
    Aa = layer.lora_A.detach().double().abs().requires_grad_(True)
    Ba = layer.lora_B.detach().double().abs().requires_grad_(True)
    ya = (xa @ layer.weight.double().abs().t() + layer.bias.double().abs()
          + scale * (xa @ Aa[:rank].t()) @ Ba[:, :rank].t())
    ya.backward(dy.double().abs())

    def err(got, ref, magnitude):
        return float((got.double() - ref).norm()) / max(float(magnitude.norm()), 1e-300)

    assert err(y, y_ref, ya) < FP32
    assert err(x.grad, x64.grad, xa.grad) < FP32
    assert err(layer.lora_B.grad[:, :rank], B.grad[:, :rank], Ba.grad[:, :rank]) < FP32
    assert err(layer.lora_A.grad[:rank], A.grad[:rank], Aa.grad[:rank]) < FP32
    assert not layer.lora_A.grad[rank:].any() and not layer.lora_B.grad[:, rank:].any()


@pytest.mark.parametrize("cls", [DyLoRALinear, NF4DyLoRALinear])
def test_compiled_training_with_one_rank_per_step(monkeypatch, cls):
    # Under torch.compile the rank is fixed per step (a rank sampled per call is an .item(): a graph
    # break). fullgraph: each step's rank runs inside the graph, outputs and gradients equal eager's.
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")
    torch._dynamo.reset()
    layer, eager = _layer(cls), _layer(cls)
    compiled = torch.compile(layer, fullgraph=True)
    gen = torch.Generator().manual_seed(4)
    ranks = []
    for step in range(4):
        ranks.append(dylora_sample_rank(layer, generator=gen))
        eager.rank = layer.rank
        x = _x(seed=step)
        y, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y, y_eager, rtol=FP32, atol=FP32)
        y.square().sum().backward()
        y_eager.square().sum().backward()
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, name).grad, getattr(eager, name).grad, rtol=FP32, atol=FP32)
    assert len(set(ranks)) > 1, ranks


# ---------------------------------------------------------------------------------------------
# 16-bit layers on both backends (the Triton kernels reading the strided B[:, :r] view), NF4 too
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(torch.float16, None), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float32)], ids=["fp16", "fp16_fp32_adapters", "bf16_fp32_adapters"])
@pytest.mark.parametrize("cls", [DyLoRALinear, NF4DyLoRALinear])
@pytest.mark.usefixtures("poisoned")
def test_half_precision_truncated_rank_against_float64(backend, cls, dtypes):
    from tests.helpers import BOUNDS, assert_close, use_backend
    dtype, adapter_dtype = dtypes
    k, n, r_max, rank, lead = 70, 45, 40, 17, (3, 7)  # M = 21: past the Triton GEMMs' small-M form
    torch.manual_seed(0)
    layer = cls(k, n, r_max, 2.0 * r_max, dtype=dtype, adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B random: PEFT's zero init would hide the LoRA term
        layer.lora_B.copy_(torch.randn(n, r_max, generator=g))
        layer.bias.copy_(torch.randn(n, generator=g))
    layer.rank = rank
    A_view, B_view, _ = layer._adapters()
    assert B_view.stride() == (r_max, 1) and not B_view.is_contiguous()  # the strided view, not a copy
    assert A_view.dtype == (adapter_dtype or dtype)
    x = torch.randn(*lead, 2 * k, generator=g).to(dtype)[..., ::2].requires_grad_(True)  # non-contiguous
    with use_backend(backend) as record:
        y = layer(x)
        dy = torch.randn(y.shape, generator=g).to(dtype)
        y.backward(dy)
    assert record.impls() == [backend] * 2  # the fused layer's forward and backward on this backend
    assert y.dtype == dtype and x.grad.dtype == dtype
    scale = 2.0 * r_max / rank
    y_ref, x64, A, B = _reference(layer, x, rank, scale)
    y_ref.backward(dy.double())
    bound = BOUNDS[dtype]
    assert_close(y, y_ref, bound, "y")
    assert_close(x.grad, x64.grad, bound, "dx")
    assert_close(layer.lora_A.grad[:rank], A.grad[:rank], bound, "dA")
    assert_close(layer.lora_B.grad[:, :rank], B.grad[:, :rank], bound, "dB")
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == A_view.dtype
    assert not layer.lora_A.grad[rank:].any() and not layer.lora_B.grad[:, rank:].any()
