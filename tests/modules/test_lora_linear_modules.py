"""``lora_kernels.modules``: LoRALinear / NF4LoRALinear swap-in layers (PEFT-free).

Every numerical check is a relative error against a float64 reference from the same parameters (or,
for bitsandbytes interop, against bnb's own output). Tiny shapes; both CPU backends where it matters
(LORA_KERNELS_CPU_BACKEND=torch: the lean PyTorch path; =triton: the kernels under the interpreter).
"""
import math
import warnings

import pytest
import torch

from lora_kernels.modules import DyLoRALinear, LoRALinear, NF4DyLoRALinear, NF4LoRALinear
from lora_kernels.ops import lora_linear_reference
from lora_kernels.ops.nf4 import NF4Weight
from tests.helpers import keep_mask_for, rel_err

K, N, R, ALPHA = 64, 24, 4, 8.0  # K a multiple of 64: bnb's CPU dequantize mis-indexes otherwise
LEAD = (2, 3)
FP32 = 1e-5
# One NF4 rounding of a random weight (blocksize 64) has a relative error of about 0.09 (measured:
# 0.078..0.10 for these shapes), and so has the output of a merged (re-quantized) layer: the bound
# allows that one rounding, not a lost or doubled adapter (the base-only output is off by ~0.9).
NF4_REQUANT = 0.15


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CPU_BACKEND", "torch")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear(seed=0, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(K, N, bias=bias).to(dtype)


def _x(seed=1, dtype=torch.float32, requires_grad=False):
    return torch.randn(*LEAD, K, generator=_gen(seed)).to(dtype).requires_grad_(requires_grad)


def _randomize_B(module, seed=2, std=1.0):
    """PEFT's zero B makes the LoRA term vanish; a random B makes every check see it."""
    with torch.no_grad():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=_gen(seed)) * std)


def _reference(x, weight, module, keep_mask=None, dropout_p=0.0):
    """float64 y = x W^T + b + scale * dropout(x) A^T B^T, differentiable in x, A, B."""
    def up(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    x64, A64, B64 = up(x), up(module.lora_A), up(module.lora_B)
    bias = None if module.bias is None else module.bias.detach().double()
    y = lora_linear_reference(x64, weight.detach().double(), A64, B64, module.scale, bias=bias,
                              keep_mask=keep_mask, dropout_p=dropout_p)
    return y, (x64, A64, B64)


def _bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.fixture
def eager_bnb():
    """bnb's torch fallback kernels are torch.compile'd; eager keeps the tests fast."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _bnb_linear4bit(dense_weight, bias=None, quant_type="nf4"):
    bnb = _bnb()
    out_features, in_features = dense_weight.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, quant_type=quant_type,
                               compress_statistics=True)
    module.weight = bnb.nn.Params4bit(dense_weight.clone(), requires_grad=False, quant_type=quant_type,
                                      compress_statistics=True)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    module = module.to("cpu")
    module.train()  # bnb's CPU eval path repacks the weight for its own inference kernel
    return module


# ---------------------------------------------------------------------------------------------
# from_linear and init
# ---------------------------------------------------------------------------------------------
def test_from_linear_shares_storage_and_freezes_the_base():
    lin = _linear()
    m = LoRALinear.from_linear(lin, R, ALPHA)
    assert m.weight.data_ptr() == lin.weight.data_ptr() and m.bias.data_ptr() == lin.bias.data_ptr()
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert lin.weight.requires_grad and lin.bias.requires_grad  # the source's flags are untouched
    assert (m.in_features, m.out_features, m.r) == (K, N, R)
    assert m.lora_A.shape == (R, K) and m.lora_B.shape == (N, R)
    assert m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.lora_A.requires_grad and m.lora_B.requires_grad
    assert [name for name, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    # PEFT's init: B zero; A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(K), 1/sqrt(K)).
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(K)
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    assert m.lora_A.std() > 0.4 * bound  # U(-b, b) has std b / sqrt(3) ~ 0.58 b

    half = _linear(dtype=torch.bfloat16)
    m16 = LoRALinear.from_linear(half, R, ALPHA)
    assert m16.lora_A.dtype == torch.bfloat16 and m16.weight.data_ptr() == half.weight.data_ptr()
    assert LoRALinear.from_linear(half, R, ALPHA, adapter_dtype=torch.float32).lora_B.dtype == torch.float32

    q = NF4LoRALinear.from_linear(lin, R, ALPHA)
    assert q.bias.data_ptr() == lin.bias.data_ptr() and not q.bias.requires_grad
    expected = NF4Weight.quantize(lin.weight.detach())
    assert torch.equal(q.qweight.packed, expected.packed) and torch.equal(q.qweight.absmax, expected.absmax)
    assert q.qweight.double_quant and q.qweight.blocksize == 64 and q.qweight.dtype == torch.float32
    assert [name for name, p in q.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert torch.count_nonzero(q.lora_B) == 0 and torch.count_nonzero(q.lora_A) == R * K


def test_init_output_is_the_base_layer(backend):
    lin = _linear()
    x = _x()
    m = LoRALinear.from_linear(lin, R, ALPHA)
    q = NF4LoRALinear.from_linear(lin, R, ALPHA)
    y, yq = m(x), q(x)
    base = lin(x)
    base_q = torch.nn.functional.linear(x, q.qweight.dequantize(), lin.bias)
    if backend == "torch":
        # B = 0: the LoRA term adds exact zeros to the same base GEMM.
        assert torch.equal(y, base) and torch.equal(yq, base_q)
    else:
        # The Triton GEMM sums in another order than BLAS: equal up to fp32 rounding.
        assert rel_err(y, base) < FP32 and rel_err(yq, base_q) < FP32


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_torch_export_runs_our_op_and_matches_eager(torch_backend, cls, strict):
    # Deploying an adapted layer with torch.export: the NF4 layer failed here (its NF4Weight was
    # rebuilt from the traced buffers and checked value by value: a data-dependent torch.equal).
    module = cls.from_linear(_linear(), R, ALPHA).eval()
    _randomize_B(module)
    program = torch.export.export(module, (_x(),), strict=strict)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("lora_kernels.") for op in ops), ops
    x = _x(seed=7)  # not the example input
    torch.testing.assert_close(program.module()(x), module(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Forward and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "freeze_A", "rslora"])
def test_forward_and_grads_match_float64(backend, variant):
    lin = _linear()
    m = LoRALinear.from_linear(lin, R, ALPHA, freeze_A=variant == "freeze_A", use_rslora=variant == "rslora")
    expected_scale = ALPHA / math.sqrt(R) if variant == "rslora" else ALPHA / R
    assert m.scale == expected_scale
    _randomize_B(m)
    x = _x(requires_grad=True)
    y = m(x)
    grad_y = torch.randn(y.shape, generator=_gen(3))
    y.backward(grad_y)
    ref, (x64, A64, B64) = _reference(x, lin.weight, m)
    assert ref.requires_grad
    ref.backward(grad_y.double())
    assert y.dtype == torch.float32 and rel_err(y, ref) < FP32
    assert rel_err(x.grad, x64.grad) < FP32 and rel_err(m.lora_B.grad, B64.grad) < FP32
    if variant == "freeze_A":
        assert m.lora_A.grad is None
    else:
        assert rel_err(m.lora_A.grad, A64.grad) < FP32
    assert m.weight.grad is None and m.bias.grad is None  # frozen base


def test_nf4_forward_and_grads_match_float64(backend):
    lin = _linear()
    q = NF4LoRALinear.from_linear(lin, R, ALPHA)
    _randomize_B(q)
    x = _x(requires_grad=True)
    y = q(x)
    grad_y = torch.randn(y.shape, generator=_gen(3))
    y.backward(grad_y)
    ref, (x64, A64, B64) = _reference(x, q.qweight.dequantize(), q)
    ref.backward(grad_y.double())
    assert rel_err(y, ref) < FP32
    for got, want in ((x.grad, x64.grad), (q.lora_A.grad, A64.grad), (q.lora_B.grad, B64.grad)):
        assert rel_err(got, want) < FP32


def test_scale_is_assignable(torch_backend):
    m = LoRALinear.from_linear(_linear(), R, ALPHA)
    _randomize_B(m)
    x = _x()
    m.scale = 0.25
    assert m.scale == 0.25
    ref, _ = _reference(x, m.weight, m)
    assert rel_err(m(x), ref) < FP32
    ref_default = lora_linear_reference(x.double(), m.weight.double(), m.lora_A.detach().double(),
                                        m.lora_B.detach().double(), ALPHA / R, bias=m.bias.double())
    assert rel_err(m(x), ref_default) > 1e-2  # the new scale is used, not alpha / r


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_dropout_identity_in_eval_and_applied_in_train(torch_backend, cls):
    p = 0.5
    m = cls.from_linear(_linear(), R, ALPHA, dropout=p)
    _randomize_B(m)
    weight = m.weight if cls is LoRALinear else m.qweight.dequantize()
    x = _x()
    no_dropout, _ = _reference(x, weight, m)
    m.eval()
    assert rel_err(m(x), no_dropout) < FP32
    m.train()
    torch.manual_seed(123)
    y = m(x)
    assert rel_err(y, no_dropout) > 1e-2  # the LoRA branch saw a dropped x
    keep = keep_mask_for(123, math.prod(LEAD), K, p).reshape(x.shape)
    dropped, _ = _reference(x, weight, m, keep_mask=keep, dropout_p=p)
    assert rel_err(y, dropped) < FP32  # and exactly the seeded mask, rescaled by 1 / (1 - p)


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------
def test_merge_unmerge_dense(torch_backend):
    lin = _linear()
    m = LoRALinear.from_linear(lin, R, ALPHA, dropout=0.5)
    _randomize_B(m)
    x = _x()
    W0 = lin.weight.detach().clone()
    m.eval()
    y0 = m(x)
    ref, _ = _reference(x, W0, m)
    m.merge()
    assert m.merged
    delta = m.scale * (m.lora_B.detach().double() @ m.lora_A.detach().double())
    assert rel_err(lin.weight, W0.double() + delta) < FP32  # written into the shared weight
    y1 = m(x)
    assert rel_err(y1, y0) < FP32 and rel_err(y1, ref) < FP32
    m.train()  # merged: no LoRA branch, so no dropout either
    assert torch.equal(m(x), y1)
    with pytest.raises(ValueError, match="already merged"):
        m.merge()
    with pytest.raises(ValueError, match="unmerge"):
        m.scale = 1.0
    with pytest.warns(UserWarning, match="merged"):
        m.state_dict()
    m.unmerge()
    assert not m.merged
    assert torch.allclose(m.weight, W0, rtol=0, atol=1e-6)
    m.eval()
    assert rel_err(m(x), ref) < FP32
    with pytest.raises(ValueError, match="not merged"):
        m.unmerge()


def test_merge_bf16_rounds_once():
    lin = _linear(dtype=torch.bfloat16)
    m = LoRALinear.from_linear(lin, R, ALPHA, adapter_dtype=torch.float32)
    _randomize_B(m)
    W0 = lin.weight.detach().clone()
    delta = m.scale * (m.lora_B.detach() @ m.lora_A.detach())
    m.merge()
    assert m.weight.dtype == torch.bfloat16
    assert torch.equal(m.weight, (W0.float() + delta).bfloat16())


def test_nf4_merge_warns_and_requantizes(torch_backend):
    lin = _linear()
    q = NF4LoRALinear.from_linear(lin, R, ALPHA)
    _randomize_B(q, std=0.3)  # the adapter term ~ the base term (the base-only output is off by ~0.8)
    q.eval()
    x = _x()
    before = q.qweight
    y0 = q(x)
    base_only = torch.nn.functional.linear(x, before.dequantize(), q.bias)
    with pytest.warns(UserWarning, match="re-quantiz"):
        q.merge()
    assert q.merged and q.qweight is not before
    delta = q.scale * (q.lora_B.detach() @ q.lora_A.detach())
    expected = NF4Weight.quantize(before.dequantize() + delta)  # same blocksize / double quant
    assert torch.equal(q.qweight.packed, expected.packed) and torch.equal(q.qweight.absmax, expected.absmax)
    y1 = q(x)
    err = rel_err(y1, y0)
    assert err < NF4_REQUANT
    assert rel_err(base_only, y0) > 3 * err  # the adapter is in the merged weight
    with pytest.raises(ValueError, match="already merged"):
        q.merge()
    with pytest.warns(UserWarning, match="not exact"):
        q.unmerge()
    assert not q.merged
    # Two roundings now: of W + delta at merge (error ~ 0.09 ||W + delta||), of W at unmerge.
    W0, merged_norm = before.dequantize(), (before.dequantize() + delta).norm()
    drift = (q.qweight.dequantize() - W0).norm()
    assert 0 < drift < NF4_REQUANT * (merged_norm + W0.norm())
    assert rel_err(q(x), y0) < 2 * NF4_REQUANT
    with pytest.raises(ValueError, match="not merged"):
        q.unmerge()


@pytest.mark.parametrize("cls", [NF4LoRALinear, NF4DyLoRALinear])
def test_nf4_merged_layer_saves_no_decoded_weight(torch_backend, cls):
    """A merged QLoRA layer in training (x requires grad) keeps no [N, K] decoded weight for backward,
    as bitsandbytes' Linear4bit keeps none; its dx is x's gradient through the merged weight."""
    q = NF4LoRALinear.from_linear(_linear(), R, ALPHA) if cls is NF4LoRALinear else cls(K, N, R, ALPHA)
    _randomize_B(q, std=0.3)
    with pytest.warns(UserWarning, match="re-quantiz"):
        q.merge()
    q.train()
    x = _x(requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert all(t.numel() < N * K for t in saved), [tuple(t.shape) for t in saved]
    gy = torch.randn(y.shape, generator=_gen(3))
    y.backward(gy)
    W = q.qweight.dequantize().double()
    assert rel_err(x.grad, gy.double() @ W) < FP32


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_layer_starts_like_a_fresh_nn_linear(bias, dtype):
    """Same seed, same base parameters as nn.Linear (then the NF4 layer quantizes exactly those)."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    torch.manual_seed(7)
    layer = LoRALinear(K, N, R, ALPHA, bias=bias, dtype=dtype)
    torch.manual_seed(7)
    q = NF4LoRALinear(K, N, R, ALPHA, bias=bias, dtype=dtype)
    assert torch.equal(layer.weight, linear.weight)
    assert torch.equal(q.qweight.dequantize(), NF4Weight.quantize(linear.weight.detach()).dequantize())
    for got in (layer.bias, q.bias):
        assert (got is None) == (not bias)
        if bias:
            assert torch.equal(got, linear.bias)


# ---------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_dense_state_dict_round_trip(torch_backend, bias):
    m = LoRALinear.from_linear(_linear(bias=bias), R, ALPHA, use_rslora=True)
    _randomize_B(m)
    sd = m.state_dict()
    assert list(sd) == ["weight"] + (["bias"] if bias else []) + ["lora_A", "lora_B"]
    fresh = LoRALinear(K, N, R, ALPHA, bias=bias, use_rslora=True)
    x = _x()
    assert rel_err(fresh(x), m(x)) > 1e-2  # different random init before loading
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh(x), m(x))
    assert fresh.weight.data_ptr() != m.weight.data_ptr()  # loaded by copy
    # The base keys are nn.Linear's.
    plain = torch.nn.Linear(K, N, bias=bias)
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith("lora_")}, strict=True)
    assert torch.equal(plain.weight, m.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_nf4_state_dict_round_trip(torch_backend, bias):
    q = NF4LoRALinear.from_linear(_linear(bias=bias), R, ALPHA)
    _randomize_B(q)
    sd = q.state_dict()
    fresh = NF4LoRALinear(K, N, R, ALPHA, bias=bias)
    x = _x()
    assert rel_err(fresh(x), q(x)) > 1e-2
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), q(x))
    for name in ("packed", "absmax", "code", "absmax_code", "absmax_scale", "absmax_offset"):
        got, want = getattr(fresh.qweight, name), getattr(q.qweight, name)
        assert torch.equal(got, want) and got.data_ptr() != want.data_ptr(), name  # copied, not aliased
    again = fresh.state_dict()
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_meta_init_then_assign_load(torch_backend, cls):
    """The no-allocation pattern: build on the meta device, load_state_dict(assign=True)."""
    src = cls.from_linear(_linear(), R, ALPHA)
    _randomize_B(src)
    m = cls(K, N, R, ALPHA, device="meta")
    m.load_state_dict(src.state_dict(), strict=True, assign=True)
    assert m.lora_A.device.type == "cpu" and not m.bias.requires_grad and m.lora_B.requires_grad
    x = _x()
    assert torch.equal(m(x), src(x))


def test_nf4_state_dict_keys_are_bnb_linear4bit_keys(eager_bnb):
    bnb = _bnb()
    lin = _linear()
    q = NF4LoRALinear.from_linear(lin, R, ALPHA)
    ours = q.state_dict()
    reference = _bnb_linear4bit(lin.weight.detach(), lin.bias.detach())
    bnb_sd = reference.state_dict()
    assert list(ours) == list(bnb_sd) + ["lora_A", "lora_B"]  # bnb's keys, bnb's order, then the adapters
    for key in bnb_sd:  # bnb quantizing the same weight writes the same bytes
        assert torch.equal(ours[key], bnb_sd[key]), key

    # Ours -> a fresh Linear4bit. bnb 0.50's Linear4bit.load_state_dict does not restore the quant
    # state (it reports those keys as unexpected); checkpoints load with Params4bit.from_prequantized.
    base = {k: v for k, v in ours.items() if not k.startswith("lora_")}
    fresh = bnb.nn.Linear4bit(K, N, bias=True, quant_type="nf4", compress_statistics=True)
    fresh.weight = bnb.nn.Params4bit.from_prequantized(
        base["weight"], {k[len("weight."):]: v for k, v in base.items() if k.startswith("weight.")}, device="cpu",
        module=fresh)
    fresh.load_state_dict({"bias": base["bias"]}, strict=False)
    decoded = bnb.functional.dequantize_4bit(fresh.weight.data, fresh.weight.quant_state)
    assert torch.equal(decoded, q.qweight.dequantize())

    # A Linear4bit's state_dict -> ours (the adapters are then the only missing keys).
    target = NF4LoRALinear(K, N, R, ALPHA)
    result = target.load_state_dict(bnb_sd, strict=False)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    assert torch.equal(target.qweight.dequantize(), q.qweight.dequantize())
    assert torch.equal(target.bias, lin.bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_loads_a_dense_checkpoint_by_quantizing_it(torch_backend, quant_type, dtype):
    """A dense fp32 checkpoint is quantized with the layer's format, in the layer's dtype (as
    nn.Module's copy_ converts a parameter), or in the checkpoint's with assign=True."""
    dense = LoRALinear.from_linear(_linear(), R, ALPHA)
    _randomize_B(dense)
    q = NF4LoRALinear(K, N, R, ALPHA, blocksize=128, double_quant=False, quant_type=quant_type, dtype=dtype)
    assert q.qweight.quant_type == quant_type
    q.load_state_dict(dense.state_dict(), strict=True)
    expected = NF4Weight.quantize(dense.weight.detach().to(dtype), blocksize=128, double_quant=False,
                                  quant_type=quant_type)
    assert q.qweight.quant_type == quant_type and q.qweight.dtype == dtype
    assert torch.equal(q.qweight.packed, expected.packed) and torch.equal(q.qweight.absmax, expected.absmax)
    assert torch.equal(q.lora_B, dense.lora_B.to(dtype))
    q.load_state_dict(dense.state_dict(), strict=True, assign=True)
    assert q.qweight.dtype == torch.float32 and q.qweight.quant_type == quant_type


def test_fp4_merge_and_unmerge_stay_fp4(torch_backend):
    q = NF4LoRALinear.from_linear(_linear(), R, ALPHA, quant_type="fp4")
    _randomize_B(q)
    before = q.qweight
    delta = q.scale * (q.lora_B.detach() @ q.lora_A.detach())
    with pytest.warns(UserWarning, match="re-quantiz"):
        q.merge()
    expected = NF4Weight.quantize(before.dequantize() + delta, quant_type="fp4")
    assert q.qweight.quant_type == "fp4" and torch.equal(q.qweight.packed, expected.packed)
    with pytest.warns(UserWarning, match="not exact"):
        q.unmerge()
    assert q.qweight.quant_type == "fp4"


def test_nf4_load_errors_name_the_problem():
    q = NF4LoRALinear(K, N, R, ALPHA)
    other = NF4LoRALinear(K, N + 8, R, ALPHA).state_dict()
    with pytest.raises(RuntimeError, match=r"NF4 weight has shape \[32, 64\], expected \[24, 64\]"):
        q.load_state_dict({k: v for k, v in other.items() if not k.startswith(("lora_", "bias"))}, strict=False)
    sd = q.state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="missing key 'weight.absmax'"):
        q.load_state_dict(sd)
    sd = {k: v for k, v in q.state_dict().items() if not k.startswith("weight")}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        q.load_state_dict(sd)


def test_nf4_to_dtype_keeps_the_format_and_to_device_moves_it(torch_backend):
    q = NF4LoRALinear.from_linear(_linear(), R, ALPHA)
    _randomize_B(q)
    before = {name: t.clone() for name, t in q.named_buffers()}
    assert set(before) == {"qweight_packed", "qweight_absmax", "qweight_code", "qweight_absmax_code",
                           "qweight_absmax_scale", "qweight_absmax_offset"}
    q.half()
    assert q.lora_A.dtype == q.lora_B.dtype == q.bias.dtype == torch.float16
    for name, t in q.named_buffers():
        assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert q.qweight.dtype == torch.float32 and q.qweight.absmax_scale.dtype == torch.float32
    x = _x(dtype=torch.float16)
    ref, _ = _reference(x, q.qweight.dequantize(), q)
    assert rel_err(q(x), ref) < 3e-3
    q.to("meta")
    assert q.qweight.device.type == "meta" and q.lora_A.device.type == "meta"
    assert q.qweight.packed.dtype == torch.uint8 and q.qweight.code.dtype == torch.float32


@pytest.mark.parametrize("context", [False, True], ids=["device_arg", "default_device"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_meta_layer_to_empty_then_load(torch_backend, quant_type, context, monkeypatch):
    """FSDP's pattern: build on meta (device= or a `with torch.device("meta")` block, which every
    factory call inside follows), to_empty() on the device, then load a checkpoint."""
    src = NF4LoRALinear.from_linear(_linear(), R, ALPHA, quant_type=quant_type)
    _randomize_B(src)
    if context:
        from lora_kernels.ops import nf4 as nf4_module
        monkeypatch.setattr(nf4_module, "_device_tables", {})  # the constant tables built inside the block
        with torch.device("meta"):
            m = NF4LoRALinear(K, N, R, ALPHA, quant_type=quant_type)
    else:
        m = NF4LoRALinear(K, N, R, ALPHA, device="meta", quant_type=quant_type)
    assert m.qweight.device.type == "meta"
    m.to_empty(device="cpu")
    assert m.qweight.device.type == "cpu" and m.qweight.quant_type == quant_type
    m.load_state_dict(src.state_dict())
    x = _x()
    assert torch.equal(m(x), src(x))


def test_nf4_buffers_replaced_directly_survive_to(torch_backend):
    q = NF4LoRALinear.from_linear(_linear(), R, ALPHA)
    other = NF4Weight.quantize(_linear(seed=5).weight.detach())
    q.qweight_packed, q.qweight_absmax = other.packed, other.absmax  # nothing reads q.qweight before .to
    q.qweight_absmax_scale, q.qweight_absmax_offset = other.absmax_scale, other.absmax_offset
    q.to("cpu")
    assert torch.equal(q.qweight.dequantize(), other.dequantize())
    assert q.qweight_packed is other.packed


def test_nf4_input_of_another_dtype_than_the_bias(torch_backend):
    """A bf16 layer (bias bf16) with fp32 adapters takes fp32 inputs unmerged as merged (the bias cast to x's)."""
    q = NF4LoRALinear(K, N, R, ALPHA, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    _randomize_B(q)
    assert "quant_type=nf4" in repr(q)
    for dtype in (torch.float32, torch.float16):
        x = _x(dtype=dtype)
        y = q(x)
        ref, _ = _reference(x, q.qweight.dequantize(torch.float32), q)
        assert y.dtype == dtype and rel_err(y, ref) < (3e-3 if dtype == torch.float16 else 1e-5)


# ---------------------------------------------------------------------------------------------
# bitsandbytes Linear4bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_from_bnb_linear4bit_shares_and_matches_bnb(backend, eager_bnb, quant_type):
    torch.manual_seed(0)
    dense, bias = torch.randn(N, K) / 8, torch.randn(N) / 8
    module = _bnb_linear4bit(dense, bias, quant_type)
    q = NF4LoRALinear.from_linear(module, R, ALPHA)
    assert q.qweight.quant_type == quant_type
    assert q.qweight.packed.data_ptr() == module.weight.data.data_ptr()
    assert q.qweight.absmax.data_ptr() == module.weight.quant_state.absmax.data_ptr()
    assert q.bias.data_ptr() == module.bias.data_ptr()
    assert (q.in_features, q.out_features) == (K, N) and q.lora_A.dtype == torch.float32
    x = _x()
    with torch.no_grad():
        expected = module(x)
    assert rel_err(q(x), expected) < FP32
    _randomize_B(q)  # and a trained adapter adds its term on top of bnb's output
    lora = q.scale * (x.double() @ q.lora_A.detach().double().t() @ q.lora_B.detach().double().t())
    assert rel_err(q(x), expected.double() + lora) < FP32
    fresh = NF4LoRALinear.from_linear(torch.nn.Linear(K, N), R, ALPHA)  # an NF4 layer takes the checkpoint's type
    fresh.load_state_dict(q.state_dict())
    assert fresh.qweight.quant_type == quant_type and torch.equal(fresh(x), q(x))


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_bad_inputs_name_the_argument(cls):
    lin = _linear()
    for kwargs, exc, pattern in (
        ({"r": 0}, ValueError, r"r must be >= 1, got 0"),
        ({"r": 2.0}, TypeError, r"r must be an int"),
        ({"alpha": 0}, ValueError, r"alpha must be > 0, got 0"),
        ({"alpha": -1.0}, ValueError, r"alpha must be > 0"),
        ({"alpha": math.inf}, ValueError, r"alpha must be finite"),
        ({"alpha": "8"}, TypeError, r"alpha must be a real number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"adapter_dtype": torch.float16}, ValueError, r"adapter_dtype must be the weight's dtype"),
    ):
        args = {"r": R, "alpha": ALPHA, **kwargs}
        with pytest.raises(exc, match=pattern):
            cls.from_linear(lin, **args)
        with pytest.raises(exc, match=pattern):
            cls(K, N, **args)
    for not_linear in (torch.nn.Conv1d(K, N, 1), torch.randn(N, K), None):
        with pytest.raises(TypeError, match=r"linear must be a torch.nn.Linear"):
            cls.from_linear(not_linear, R, ALPHA)
    with pytest.raises(ValueError, match=r"in_features must be >= 1"):
        cls(0, N, R, ALPHA)
    with pytest.raises(ValueError, match=r"dtype must be float32, float16 or bfloat16"):
        cls(K, N, R, ALPHA, dtype=torch.float64)
    m = cls(K, N, R, ALPHA)
    with pytest.raises(ValueError, match=r"scale must be finite"):
        m.scale = math.nan
    with pytest.raises(TypeError, match=r"linear.weight must be float32, float16 or bfloat16"):
        cls.from_linear(_linear().double(), R, ALPHA)


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_merged_layer_rejects_bad_input_as_the_unmerged_one(torch_backend, cls):
    layer = cls(K, N, R, ALPHA)
    bad = [torch.randn(2, K + 1), torch.tensor(1.0), torch.randn(2, K, dtype=torch.float64),
           torch.ones(2, K, dtype=torch.int64)]
    if cls is LoRALinear:
        bad.append(torch.randn(2, K, dtype=torch.float16))  # the dense weight is fp32
    errors = []
    for merged in (False, True):
        if merged:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NF4: the merge re-quantizes
                layer.merge()
        for x in bad:
            with pytest.raises((ValueError, TypeError), match="x must|weight must") as info:
                layer(x)
            errors.append((info.type, str(info.value)))
    assert errors[:len(bad)] == errors[len(bad):]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts x and W for the merged matmul
        for x_in in (x, x.bfloat16()):
            assert layer(x_in).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_merged_layer_takes_what_its_linear_takes(torch_backend, cls):
    # bf16 adapters and an fp32 x under autocast (the unmerged layer takes it too); a trainable
    # weight after the merge (full fine-tuning of the merged model); a merged DyLoRA layer in training
    # draws no rank (torch's RNG untouched: later dropout masks stay as they were)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    layer = cls(K, N, R, ALPHA, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NF4: the merge re-quantizes
        layer.merge()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    if cls is LoRALinear:
        dense = cls(K, N, R, ALPHA)
        dense.merge()
        dense.weight.requires_grad_(True)
        dense(x).sum().backward()
        assert dense.weight.grad is not None
    dylora = (DyLoRALinear if cls is LoRALinear else NF4DyLoRALinear)(K, N, R, ALPHA, frozen=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dylora.merge()
    dylora.train()
    state = torch.get_rng_state()
    dylora(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_bnb_layers_are_routed_to_the_nf4_class(eager_bnb):
    torch.manual_seed(0)
    module = _bnb_linear4bit(torch.randn(N, K))
    with pytest.raises(TypeError, match=r"use NF4LoRALinear.from_linear"):
        LoRALinear.from_linear(module, R, ALPHA)
    with pytest.raises(ValueError, match=r"blocksize apply only when quantizing an nn.Linear"):
        NF4LoRALinear.from_linear(module, R, ALPHA, blocksize=128)
    bnb = _bnb()
    not_quantized = bnb.nn.Linear4bit(K, N, quant_type="nf4")
    with pytest.raises(ValueError, match=r"not quantized yet"):
        NF4LoRALinear.from_linear(not_quantized, R, ALPHA)
    with pytest.raises(ValueError, match=r"quant_type apply only when quantizing an nn.Linear"):
        NF4LoRALinear.from_linear(module, R, ALPHA, quant_type="fp4")
