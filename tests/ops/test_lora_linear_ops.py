"""The torch.library custom ops ``lora_kernels::lora_linear_fwd`` / ``lora_linear_bwd`` called
directly, on both CPU backends (Triton interpreter and the lean torch path): outputs against
explicit float64 formulas, every combination of need flags, opcheck, fake (meta) implementations,
and the backend decision ``select_backend``."""
import itertools
import math
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lora_kernels.kernels.configs import MAX_RANK
from lora_kernels.ops import CPU_BACKEND_ENV, dropout_keep_mask, lora_linear_bwd, lora_linear_fwd, select_backend
from lora_kernels.ops.lora_linear import DENSE_TORCH_MAX_M_ENV
from lora_kernels.ops.triton_launch import is_interpreted
from tests.helpers import (BWD_NEED_FLAGS, DTYPE_IDS, assert_close, bound_for, make_grad_y, make_problem,
                           use_backend)

FWD = torch.ops.lora_kernels.lora_linear_fwd.default
BWD = torch.ops.lora_kernels.lora_linear_bwd.default
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float32)]


def _pair_id(pair):
    return f"x{DTYPE_IDS[pair[0]]}-lora{DTYPE_IDS[pair[1]]}"


pytestmark = pytest.mark.usefixtures("poisoned")


# ---------------------------------------------------------------------------------------------
# Inputs and explicit float64 formulas
# ---------------------------------------------------------------------------------------------
def op_inputs(lead, K, N, r, x_dtype, adapter_dtype, *, bias=None, dropout_p=0.0, seed_value=0,
              layout="contiguous", device="cpu", seed=0):
    """Tensors for the ops (no grad). bias: None, "x" (x's dtype) or "fp32" combined bias."""
    pb = make_problem(lead, K, N, r, x_dtype, adapter_dtype, bias=bias is not None,
                      bias_dtype=torch.float32 if bias == "fp32" else x_dtype, layout=layout,
                      seed=seed, device=device, requires_grad=())
    seed_t = torch.tensor([seed_value], dtype=torch.int64, device=device) if dropout_p > 0 else None
    return dict(x=pb.x, weight=pb.weight, lora_A=pb.lora_A, lora_B=pb.lora_B, bias=pb.bias,
                scale=pb.scale, dropout_p=dropout_p, seed=seed_t)


def _keep(seed, M, K, p):
    if seed is None:
        return torch.ones(M, K, dtype=torch.float64)
    return dropout_keep_mask(seed.cpu(), M, K, p).double()


def ref_forward(x, weight, lora_A, lora_B, bias, scale, dropout_p, seed):
    """float64 (y [..., N], h [M, r]) of y = x W^T + scale * dropout(x) A^T B^T + bias."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.detach().cpu().double().reshape(-1, K)
    keep = _keep(seed, x2.shape[0], K, dropout_p)
    h = (x2 * keep / (1.0 - dropout_p)) @ lora_A.cpu().double().t()
    y = x2 @ weight.cpu().double().t() + scale * (h @ lora_B.cpu().double().t())
    if bias is not None:
        y = y + bias.cpu().double()
    return y.reshape(*x.shape[:-1], N), h


def ref_backward(grad_y, x, weight, lora_A, lora_B, h, seed, scale, dropout_p):
    """float64 (dx [..., K], dA, dB, dbias) from the given tensors (h as passed, not recomputed)."""
    N, K = weight.shape
    dy = grad_y.cpu().double().reshape(-1, N)
    x2 = x.detach().cpu().double().reshape(-1, K)
    W, A, B = (t.detach().cpu().double() for t in (weight, lora_A, lora_B))
    keep = _keep(seed, x2.shape[0], K, dropout_p) / (1.0 - dropout_p)
    d_h = scale * dy @ B
    dx = dy @ W + keep * (d_h @ A)
    d_a = d_h.t() @ (x2 * keep)
    d_b = scale * dy.t() @ h.detach().cpu().double()
    return dx.reshape(x.shape), d_a, d_b, dy.sum(0)


def _fwd(t):
    return lora_linear_fwd(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], t["scale"],
                           t["dropout_p"], t["seed"])


# ---------------------------------------------------------------------------------------------
# Forward op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("bias", [None, "x", "fp32"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_op_outputs(backend, pair, bias, dropout_p):
    x_dtype, adapter_dtype = pair
    lead, K, N, r = (2, 13), 37, 29, 5
    t = op_inputs(lead, K, N, r, x_dtype, adapter_dtype, bias=bias, dropout_p=dropout_p,
                  seed_value=2**40 + 123, device=backend.device, layout="sliced")
    y, h = _fwd(t)
    y_ref, h_ref = ref_forward(**t)
    assert backend.impls() == [backend.expected_impl(26, N, K, r)]
    assert y.shape == (*lead, N) and y.dtype == x_dtype and y.device == t["x"].device
    assert h.shape == (26, r) and h.dtype == adapter_dtype
    bound = bound_for(x_dtype)
    assert_close(y, y_ref, bound, "y")
    assert_close(h, h_ref, bound, "h")


@pytest.mark.parametrize("r", [1, 16, 17, 64, 100, 200, 256, MAX_RANK + 1, 300])
def test_forward_op_ranks(backend, r):
    # r <= 256 runs the kernels (padded rank up to 256); r > 256 takes the torch path on every backend.
    t = op_inputs((9,), 21, 19, r, torch.float32, torch.float32, bias="x", dropout_p=0.2,
                  seed_value=77, device=backend.device)
    y, h = _fwd(t)
    y_ref, h_ref = ref_forward(**t)
    assert backend.impls() == [backend.expected_impl(9, 19, 21, r)]
    if r > MAX_RANK:
        assert backend.impls() == ["torch"]
    assert_close(y, y_ref, bound_for(torch.float32), "y")
    assert_close(h, h_ref, bound_for(torch.float32), "h")


@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 5)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_ops_with_zero_rows(backend, lead, dropout_p):
    K, N, r = 11, 7, 4
    t = op_inputs(lead, K, N, r, torch.float32, torch.float32, bias="x", dropout_p=dropout_p,
                  device=backend.device)
    y, h = _fwd(t)
    assert y.shape == (*lead, N) and h.shape == (0, r)
    assert backend.impls() == ["torch"]
    grad_y = torch.randn(*lead, N, device=backend.device)
    dx, d_a, d_b, d_bias = lora_linear_bwd(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h,
                                           t["seed"], t["scale"], dropout_p, True, True, True, True)
    assert dx.shape == t["x"].shape
    # sums over zero rows: exact zeros (not the NaN of poisoned memory)
    for got, shape in ((d_a, (r, K)), (d_b, (N, r)), (d_bias, (N,))):
        assert got.shape == shape and torch.equal(got, torch.zeros_like(got))


# ---------------------------------------------------------------------------------------------
# Backward op
# ---------------------------------------------------------------------------------------------
BWD_CASES = {  # name: (x dtype, adapter dtype, dropout_p, lead, K, N, r)
    "fp32": (torch.float32, torch.float32, 0.0, (21,), 33, 40, 6),
    "fp32-dropout-3d": (torch.float32, torch.float32, 0.25, (3, 7), 45, 23, 19),
    "bf16-lora32-dropout": (torch.bfloat16, torch.float32, 0.4, (17,), 30, 37, 3),
    "fp16-dropout": (torch.float16, torch.float16, 0.1, (2, 9), 26, 31, 33),
}


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=4)),
                         ids=lambda n: "".join("xABb"[i] if v else "-" for i, v in enumerate(n)))
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_backward_op_need_flags(backend, case, needs):
    x_dtype, adapter_dtype, p, lead, K, N, r = BWD_CASES[case]
    need_x, need_A, need_B, need_bias = needs
    t = op_inputs(lead, K, N, r, x_dtype, adapter_dtype, dropout_p=p, seed_value=2**62 - 5,
                  device=backend.device, layout="transposed")
    gen = torch.Generator().manual_seed(5)
    grad_y = torch.randn(*lead, N, generator=gen).to(device=backend.device, dtype=x_dtype)
    h = torch.randn(math.prod(lead), r, generator=gen).to(device=backend.device, dtype=adapter_dtype)
    refs = ref_backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, t["seed"], t["scale"], p)
    # As the autograd layer does: x only when dA is needed, h only when dB is needed.
    outs = lora_linear_bwd(grad_y, t["x"] if need_A else None, t["weight"], t["lora_A"], t["lora_B"],
                           h if need_B else None, t["seed"], t["scale"], p, need_x, need_A, need_B, need_bias)
    M = math.prod(lead)
    assert backend.impls() == [backend.expected_impl(M, N, K, r)]
    assert tuple(backend.calls[0][2][BWD_NEED_FLAGS]) == needs
    dtypes = (x_dtype, adapter_dtype, adapter_dtype, torch.float32)
    bound = bound_for(x_dtype)
    for name, need, got, ref, dtype in zip(("dx", "dA", "dB", "dbias"), needs, outs, refs, dtypes):
        if need:
            assert got.dtype == dtype, name
            assert_close(got, ref, bound, name)
        else:
            assert got.shape == (0,), f"{name} not needed: expected an empty tensor, got {tuple(got.shape)}"


def test_ops_compute_in_their_inputs_dtypes_under_autocast(backend):
    """The ops called under torch.autocast (the public functions cast the inputs first; these get
    them as given): same outputs, bit for bit, and dtypes as without it, as the fake impls say."""
    _, _, p, lead, K, N, r = BWD_CASES["bf16-lora32-dropout"]
    t = op_inputs(lead, K, N, r, torch.float32, torch.float32, dropout_p=p, seed_value=77, device=backend.device)
    grad_y = torch.randn(*lead, N, generator=torch.Generator().manual_seed(6)).to(backend.device)
    needs = (True, True, True, True)

    def run():
        y, h = _fwd(t)
        return (y, h, *lora_linear_bwd(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, t["seed"],
                                       t["scale"], p, *needs))

    plain = run()
    with torch.autocast(backend.device.type, dtype=torch.float16):
        under_autocast = run()
    for name, got, want in zip(("y", "h", "dx", "dA", "dB", "dbias"), under_autocast, plain):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), name


def test_backward_op_accepts_unneeded_x_and_h(backend):
    t = op_inputs((13,), 20, 18, 5, torch.float32, torch.float32, device=backend.device)
    grad_y = torch.randn(13, 18, device=backend.device)
    _, h = _fwd(t)
    dx, d_a, d_b, d_bias = lora_linear_bwd(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, None,
                                           t["scale"], 0.0, True, False, False, False)
    refs = ref_backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, None, t["scale"], 0.0)
    assert_close(dx, refs[0], bound_for(torch.float32), "dx")
    assert d_a.shape == d_b.shape == d_bias.shape == (0,)


def test_backward_op_without_seed_applies_no_dropout_scaling(backend):
    # seed None means no dropout ran (the seed is present exactly when dropout is active), whatever
    # dropout_p says: no 1/(1-p) on any gradient (the Triton dA kernel once applied it to dA alone)
    t = op_inputs((13,), 20, 18, 5, torch.float32, torch.float32, device=backend.device, seed=4)
    grad_y = torch.randn(13, 18, device=backend.device, generator=torch.Generator(backend.device).manual_seed(5))
    _, h = _fwd(t)
    got = lora_linear_bwd(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, None, t["scale"], 0.3,
                          True, True, True, True)
    refs = ref_backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], h, None, t["scale"], 0.0)
    for name, g, ref in zip(("dx", "dA", "dB", "dbias"), got, refs):
        assert_close(g, ref, bound_for(torch.float32), name)


def test_backward_op_missing_inputs_raise(backend):
    t = op_inputs((5,), 8, 6, 2, torch.float32, torch.float32, device=backend.device)
    grad_y = torch.randn(5, 6, device=backend.device)
    h = torch.randn(5, 2, device=backend.device)
    with pytest.raises(ValueError, match="need_A requires x"):
        lora_linear_bwd(grad_y, None, t["weight"], t["lora_A"], t["lora_B"], h, None, 1.0, 0.0,
                        False, True, False, False)
    with pytest.raises(ValueError, match="need_B requires h"):
        lora_linear_bwd(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], None, None, 1.0, 0.0,
                        False, False, True, False)


def test_backward_op_unneeded_outputs_do_not_alias(backend):
    # Custom-op outputs must not alias each other: each empty gradient is its own tensor.
    t = op_inputs((4,), 8, 6, 2, torch.float32, torch.float32, device=backend.device)
    grad_y = torch.randn(4, 6, device=backend.device)
    outs = lora_linear_bwd(grad_y, None, t["weight"], t["lora_A"], t["lora_B"], None, None, 1.0, 0.0,
                           False, False, False, False)
    assert all(o.shape == (0,) for o in outs)
    assert len({id(o) for o in outs}) == 4


# ---------------------------------------------------------------------------------------------
# opcheck and fake implementations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck_forward(backend, with_bias, with_dropout):
    p = 0.2 if with_dropout else 0.0
    t = op_inputs((3, 5), 24, 20, 4, torch.float32, torch.float32, bias="fp32" if with_bias else None,
                  dropout_p=p, seed_value=123456789, device=backend.device)
    for name in ("x", "lora_A", "lora_B", "bias"):
        if t[name] is not None:
            t[name] = t[name].detach().requires_grad_(True)
    torch.library.opcheck(FWD, (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], t["scale"], p, t["seed"]))
    assert "triton" in backend.impls() or backend.name == "torch"


@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, True, False), (False, True, False, True)])
def test_opcheck_backward(backend, with_dropout, needs):
    p = 0.2 if with_dropout else 0.0
    t = op_inputs((3, 5), 24, 20, 4, torch.float32, torch.float32, dropout_p=p, seed_value=99,
                  device=backend.device)
    grad_y = torch.randn(3, 5, 20, device=backend.device)
    h = torch.randn(15, 4, device=backend.device)
    need_x, need_A, need_B, need_bias = needs
    torch.library.opcheck(BWD, (grad_y, t["x"] if need_A else None, t["weight"], t["lora_A"], t["lora_B"],
                                h if need_B else None, t["seed"], t["scale"], p, *needs))


def _meta(t):
    return tuple((tuple(o.shape), o.dtype, o.device.type, tuple(o.stride()) if o.numel() else None) for o in t)


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.float16, torch.float16)], ids=_pair_id)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (0,), (3, 0)])
def test_fake_impls_match_real_outputs(backend, pair, lead):
    x_dtype, adapter_dtype = pair
    t = op_inputs(lead, 12, 10, 3, x_dtype, adapter_dtype, bias="fp32", dropout_p=0.1, seed_value=5,
                  device=backend.device, layout="transposed")
    real_fwd = _fwd(t)
    gen = torch.Generator().manual_seed(3)
    grad_y = torch.randn(*lead, 10, generator=gen).to(device=backend.device, dtype=x_dtype)
    bwd_args = lambda d, needs: (d["grad_y"], d["x"], d["weight"], d["lora_A"], d["lora_B"],  # noqa: E731
                                 d["h"], d["seed"], d["scale"], 0.1, *needs)
    tensors = {**t, "grad_y": grad_y, "h": real_fwd[1]}
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
        fake_fwd = FWD(fake["x"], fake["weight"], fake["lora_A"], fake["lora_B"], fake["bias"],
                       fake["scale"], 0.1, fake["seed"])
    assert _meta(fake_fwd) == _meta(real_fwd)
    for needs in itertools.product([False, True], repeat=4):
        real_bwd = BWD(*bwd_args(tensors, needs))
        with FakeTensorMode() as mode:
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
            fake_bwd = BWD(*bwd_args(fake, needs))
        assert _meta(fake_bwd) == _meta(real_bwd), needs


# ---------------------------------------------------------------------------------------------
# Backend decision
# ---------------------------------------------------------------------------------------------
def test_select_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(CPU_BACKEND_ENV, raising=False)
    auto_cpu = "triton" if is_interpreted() else "torch"
    assert select_backend(cpu, 10, 10, 10, 4) == auto_cpu
    assert select_backend(cpu, 10, 10, 10, MAX_RANK) == auto_cpu
    for M, N, K, r in ((0, 10, 10, 4), (10, 0, 10, 4), (10, 10, 0, 4), (10, 10, 10, MAX_RANK + 1),
                       (10, 10, 10, 1000)):
        assert select_backend(cpu, M, N, K, r) == "torch", (M, N, K, r)
        assert select_backend(cuda, M, N, K, r) == "torch", (M, N, K, r)
    assert select_backend(cuda, 10, 10, 10, 16) == "triton"
    assert select_backend(torch.device("meta"), 10, 10, 10, 16) == "torch"

    monkeypatch.setenv(CPU_BACKEND_ENV, "auto")
    assert select_backend(cpu, 10, 10, 10, 4) == auto_cpu
    monkeypatch.setenv(CPU_BACKEND_ENV, "torch")
    assert select_backend(cpu, 10, 10, 10, 4) == "torch"
    assert select_backend(cuda, 10, 10, 10, 4) == "triton"  # the env var only concerns CPU tensors
    monkeypatch.setenv(CPU_BACKEND_ENV, "triton")
    if is_interpreted():
        assert select_backend(cpu, 10, 10, 10, 4) == "triton"
        assert select_backend(cpu, 0, 10, 10, 4) == "torch"  # empty problems: torch regardless
        assert select_backend(cpu, 10, 10, 10, MAX_RANK + 1) == "torch"
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            select_backend(cpu, 10, 10, 10, 4)
    for bad in ("gpu-please", "TORCH", ""):
        monkeypatch.setenv(CPU_BACKEND_ENV, bad)
        with pytest.raises(ValueError, match=CPU_BACKEND_ENV):
            select_backend(cpu, 10, 10, 10, 4)


def test_select_backend_small_m_route(monkeypatch):
    # dense CUDA calls without dropout (small_m_torch) of at most DENSE_TORCH_MAX_M rows: PyTorch
    from lora_kernels.kernels import configs
    cuda = torch.device("cuda")
    monkeypatch.delenv(DENSE_TORCH_MAX_M_ENV, raising=False)
    m = configs.DENSE_TORCH_MAX_M
    assert m > 0
    assert [select_backend(cuda, M, 64, 64, 8, small_m_torch=True) for M in (1, m, m + 1)] == \
        ["torch", "torch", "triton"]
    assert select_backend(cuda, 1, 64, 64, 8) == "triton"  # NF4, or dropout: the kernels
    monkeypatch.setenv(DENSE_TORCH_MAX_M_ENV, "0")
    assert select_backend(cuda, 1, 64, 64, 8, small_m_torch=True) == "triton"
    monkeypatch.setenv(DENSE_TORCH_MAX_M_ENV, "100")
    assert select_backend(cuda, 100, 64, 64, 8, small_m_torch=True) == "torch"
    monkeypatch.delenv(CPU_BACKEND_ENV, raising=False)
    auto_cpu = "triton" if is_interpreted() else "torch"
    assert select_backend(torch.device("cpu"), 1, 64, 64, 8, small_m_torch=True) == auto_cpu  # CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M, dropout_p, impl", [(1, 0.0, "torch"), (16, 0.0, "torch"), (16, 0.1, "triton"),
                                                (17, 0.0, "triton")])
def test_small_m_route_on_cuda(M, dropout_p, impl):
    # the route each dense call takes on CUDA, forward and backward alike, against float64
    from tests.autograd.test_lora_linear import _run_and_check
    with use_backend("cuda") as record:  # (restores the variable popped below)
        os.environ.pop(DENSE_TORCH_MAX_M_ENV)  # the default, not the kernels-only "cuda" backend's 0
        record.expected_impl = lambda *args: impl
        pb = make_problem((M,), 96, 80, 8, torch.bfloat16, torch.float32, bias=True, seed=M)
        _run_and_check(record, pb, make_grad_y(pb), dropout_p=dropout_p)
