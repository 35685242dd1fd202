"""``forward_route``: the public functions run one forward implementation three ways (the
implementation itself without autograd, an autograd function in eager training, the custom op while
compiling, under a dispatch mode or for tensor subclasses). Which one runs is checked by the
autograd node it leaves, and the three must agree bit for bit: outputs, every gradient, dropout
masks and what is saved for backward."""
import importlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_kernels
from lora_kernels import NF4Weight

# The modules (the package re-exports functions of the same names).
dense_mod = importlib.import_module("lora_kernels.autograd.lora_linear")
nf4_mod = importlib.import_module("lora_kernels.autograd.nf4_lora_linear")

OP_NODE = "GeneratedBackwardFor_lora_kernels_"  # prefix of the custom op's autograd node

pytestmark = pytest.mark.usefixtures("poisoned")


def _problem(nf4: bool, seed=0, freeze_A=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True, div=1.0):
        return (torch.randn(*shape, generator=g) / div).to(device).requires_grad_(grad)

    x, W = rand(3, 5, 64), rand(24, 64, grad=False, div=8)
    A, B = rand(4, 64, grad=not freeze_A), rand(24, 4)
    weight = NF4Weight.quantize(W.cpu()).to(device) if nf4 else W
    return dict(x=x, weight=weight, A=A, B=B, bias=rand(24), lora_B_bias=rand(24))


def _call(p, nf4: bool, dropout_p=0.0, **overrides):
    fn = lora_kernels.nf4_lora_linear if nf4 else lora_kernels.lora_linear
    t = {**p, **overrides}
    return fn(t["x"], t["weight"], t["A"], t["B"], 0.5, bias=t["bias"], lora_B_bias=t["lora_B_bias"],
              dropout_p=dropout_p)


def _node(y) -> str:
    return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"


def _train_step(p, nf4, dropout_p, op: bool, monkeypatch):
    """y, its autograd node's name, the gradients of every leaf and the bytes saved for backward;
    op=True routes the forward through the custom op (as while compiling), the backward not."""
    leaves = [t for t in (p["x"], p["A"], p["B"], p["bias"], p["lora_B_bias"]) if t.requires_grad]
    saved = []
    torch.manual_seed(7)  # the dropout seed is drawn from torch's RNG
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with monkeypatch.context() as m:
            if op:  # not torch.compiler.is_compiling: torch._dynamo, if first imported then, breaks
                m.setattr(dense_mod, "custom_op_needed", lambda *tensors: True)
            y = _call(p, nf4, dropout_p)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), _node(y), grads, sorted(t.numel() * t.element_size() for t in saved)


@pytest.mark.parametrize("freeze_A", [False, True], ids=["lora", "lora_fa"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_autograd_function_and_custom_op_agree_bit_for_bit(monkeypatch, backend, nf4, dropout_p, freeze_A):
    p = _problem(nf4, freeze_A=freeze_A, device=backend.device)
    y_fn, node_fn, grads_fn, saved_fn = _train_step(p, nf4, dropout_p, op=False, monkeypatch=monkeypatch)
    y_op, node_op, grads_op, saved_op = _train_step(p, nf4, dropout_p, op=True, monkeypatch=monkeypatch)
    # both routes ran the backend's implementation, forward and backward
    assert backend.impls() == [backend.impl] * 4
    assert node_fn == ("NF4LoRALinearFunctionBackward" if nf4 else "LoRALinearFunctionBackward")
    assert node_op.startswith(OP_NODE)
    assert torch.equal(y_fn, y_op)
    assert len(grads_fn) == len(grads_op) == (4 if freeze_A else 5)
    for g_fn, g_op in zip(grads_fn, grads_op):
        assert torch.equal(g_fn, g_op) and math.isfinite(float(g_op.abs().sum())) and g_op.abs().sum() > 0
    assert saved_fn == saved_op
    if freeze_A:  # LoRA-FA: h [M, r] is the only activation saved, never x
        assert p["x"].numel() * 4 not in saved_fn


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_no_autograd_runs_the_implementation_itself(monkeypatch, backend, nf4):
    p = _problem(nf4, device=backend.device)
    impl_name = "nf4_lora_linear_forward" if nf4 else "lora_linear_forward"
    mod = nf4_mod if nf4 else dense_mod
    y_train = _call(p, nf4)
    calls = []
    real = getattr(mod, impl_name)
    monkeypatch.setattr(mod, impl_name, lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y_nograd = _call(p, nf4)                                   # grad mode off
    frozen = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    y_frozen = _call(frozen, nf4)                                  # nothing requires grad
    assert calls == [1, 1] and _node(y_nograd) == _node(y_frozen) == "none"
    assert torch.equal(y_nograd, y_train.detach()) and torch.equal(y_frozen, y_train.detach())


def test_fake_tensors_take_the_custom_op_with_and_without_grad(backend):
    """Fake tensors (FakeTensorMode: shape propagation, memory estimates) never reach a kernel or
    the PyTorch path: the op's fake implementation answers, and backward runs the backward op's."""
    with FakeTensorMode():
        x, W = torch.randn(2, 7, 32), torch.randn(24, 32)
        A, B = torch.randn(4, 32), torch.randn(24, 4)
        with torch.no_grad():
            y = lora_kernels.lora_linear(x, W, A, B, 2.0)
        assert y.shape == (2, 7, 24) and type(y).__name__ == "FakeTensor"
        x.requires_grad_(True)
        A.requires_grad_(True)
        y = lora_kernels.lora_linear(x, W, A, B, 2.0, dropout_p=0.1)
        assert _node(y).startswith(OP_NODE)
        y.sum().backward()
        assert x.grad.shape == x.shape and A.grad.shape == A.shape and type(x.grad).__name__ == "FakeTensor"
    assert backend.impls("fwd") == backend.impls("bwd") == []


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_autograd_function_is_differentiable_once(backend, nf4):
    """Its backward is not itself differentiable (the kernels have no double backward): asking for a
    second derivative raises instead of returning a wrong one, whatever the loss and whichever
    inputs the second derivative is taken for (a loss linear in y gave an input gradient that did
    not require grad, and a penalty on it then silently dropped its second-order term)."""
    p = _problem(nf4, device=backend.device)
    adapters = [p["A"], p["B"]]
    for loss_of in (torch.sum, lambda y: y.square().sum()):
        with pytest.raises(RuntimeError, match="second derivative"):
            torch.autograd.grad(loss_of(_call(p, nf4)), p["x"], create_graph=True)
        with pytest.raises(RuntimeError, match="second derivative"):
            torch.autograd.grad(loss_of(_call(p, nf4)), adapters, create_graph=True)
    y = _call(p, nf4)  # first derivatives as before
    assert all(g is not None for g in torch.autograd.grad(y.square().sum(), [p["x"], *adapters]))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_backward_fills_no_gradient_for_h(backend, nf4):
    """h (the second output, non-differentiable) never receives a gradient: the autograd function
    tells the engine not to build a zero-filled one for it on every backward (``aten::zeros``, one
    more kernel per layer on a GPU), and builds y's only when no gradient reached y, as the engine did."""
    from torch.profiler import ProfilerActivity, profile

    p = _problem(nf4, device=backend.device)
    leaves = [p["x"], p["A"], p["B"], p["bias"], p["lora_B_bias"]]
    y = _call(p, nf4)
    assert _node(y) == ("NF4LoRALinearFunction" if nf4 else "LoRALinearFunction") + "Backward"
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        grads = torch.autograd.grad(y, leaves, grad_y)
    # (the NF4 layer's CPU path fills a [M, K] buffer of its own)
    h_shape = [y[..., 0].numel(), p["A"].shape[0]]
    filled = [e.input_shapes[0] for e in prof.events() if e.name == "aten::zero_"]
    assert h_shape not in filled, filled
    assert all(g is not None and g.isfinite().all() for g in grads)

    class NoGradient(torch.autograd.Function):  # passes y on and gives it no gradient
        @staticmethod
        def forward(ctx, t):
            return t * 1

        @staticmethod
        def backward(ctx, g):
            return None

    # no gradient reaches y: the gradients of zeros (x's is the extra term's alone)
    none_reached = torch.autograd.grad(NoGradient.apply(_call(p, nf4)).sum() + (p["x"] * 3).sum(), leaves)
    zeros = torch.autograd.grad([_call(p, nf4), (p["x"] * 3).sum()], leaves, [torch.zeros_like(y), None])
    for got, want in zip(none_reached, zeros):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    assert torch.equal(none_reached[0], torch.full_like(p["x"], 3.0))


def test_custom_op_needed():
    needed = dense_mod.custom_op_needed
    plain, param = torch.zeros(1), torch.nn.Parameter(torch.zeros(1))
    assert not needed(plain, param, None)

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        return t + 1 if needed(t) else t - 1

    assert float(traced(plain)) == 1.0  # while dynamo traces

    class Sub(torch.Tensor):
        pass

    assert needed(plain, plain.as_subclass(Sub))
    with FakeTensorMode():
        assert needed(plain)
    assert not needed(plain)


@pytest.mark.parametrize("op", [False, True], ids=["function", "custom_op"])
@pytest.mark.parametrize("two_dim", [False, True], ids=["x3d", "x2d"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_output_can_be_modified_in_place(monkeypatch, backend, nf4, two_dim, op):
    """Like nn.Linear's output (``y += residual``, ``ReLU(inplace=True)``): autograd refuses in-place
    writes to a view made inside a custom op or function, which the output therefore must not be.
    Writing y *= 3 then gives 3x every gradient."""
    p = _problem(nf4, device=backend.device)
    if two_dim:
        p["x"] = p["x"].detach().reshape(15, 64).requires_grad_(True)
    leaves = [p[k] for k in ("x", "A", "B", "bias", "lora_B_bias")]
    grad_y = torch.randn(*p["x"].shape[:-1], 24, generator=torch.Generator().manual_seed(2)).to(backend.device)
    with monkeypatch.context() as m:
        if op:
            m.setattr(dense_mod, "custom_op_needed", lambda *tensors: True)
        y = _call(p, nf4)
        plain = torch.autograd.grad(_call(p, nf4), leaves, grad_y)
    assert _node(y).startswith(OP_NODE) if op else "Function" in _node(y)
    y_before = y.detach().clone()
    y.mul_(3.0)
    assert torch.equal(y.detach(), y_before * 3.0)
    for got, want in zip(torch.autograd.grad(y, leaves, grad_y), plain):
        torch.testing.assert_close(got, want * 3.0, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("op", [False, True], ids=["function", "custom_op"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_autocast_casts_the_inputs_as_for_nn_linear(monkeypatch, backend, nf4, op):
    """Under torch.autocast the floating inputs are cast to its dtype, as nn.Linear's are: output and
    gradients equal those of the call on inputs cast by hand, the output in that dtype, the fp32
    parameters' gradients in fp32; nothing inside runs under autocast (the PyTorch path's matmuls
    would otherwise mix dtypes and break the backward)."""
    p = _problem(nf4, device=backend.device)
    leaves = [p[k] for k in ("x", "A", "B", "bias", "lora_B_bias")]
    dtype = torch.float16  # not bf16: the Triton interpreter's bf16 dots are wrong (triton#11584)
    grad_y = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(backend.device, dtype)
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    y_cast = _call(cast, nf4)
    grads_cast = torch.autograd.grad(y_cast, leaves, grad_y)
    with monkeypatch.context() as m:
        if op:
            m.setattr(dense_mod, "custom_op_needed", lambda *tensors: True)
        with torch.autocast(backend.device.type, dtype=dtype):
            y = _call(p, nf4)
            with torch.no_grad():
                y_nograd = _call(p, nf4)
    assert y.dtype == y_nograd.dtype == dtype
    assert torch.equal(y, y_cast) and torch.equal(y_nograd, y_cast.detach())
    for got, want, leaf in zip(torch.autograd.grad(y, leaves, grad_y), grads_cast, leaves):
        assert got.dtype == leaf.dtype == torch.float32 and torch.equal(got, want)


def test_autocast_inside_torch_compile(cpu_backend):
    """torch.compile(fullgraph=True) traces the autocast casts and the op: same output (dtype
    included) and gradients as eager."""
    p = _problem(False)
    leaves = [p[k] for k in ("x", "A", "B")]

    def step(x):
        with torch.autocast("cpu", dtype=torch.float16):
            return _call({**p, "x": x}, False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(p["x"]), step(p["x"])
    assert y.dtype == torch.float16 and torch.equal(y, y_eager)
    grads, grads_eager = (torch.autograd.grad(t.float().sum(), leaves) for t in (y, y_eager))
    for got, want in zip(grads, grads_eager):
        assert got.dtype == torch.float32 and torch.equal(got, want)
