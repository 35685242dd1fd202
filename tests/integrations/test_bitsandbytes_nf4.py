"""``lora_kernels.integrations.bitsandbytes``: NF4Weight <-> bnb Params4bit / Linear4bit / QuantState
conversions share storage and decode identically; state dicts cross in both directions; importing
lora_kernels does not import bitsandbytes."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from lora_kernels.ops.nf4 import NF4Weight

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from lora_kernels.integrations.bitsandbytes import linear4bit_from_nf4, nf4_from_bnb, nf4_to_bnb  # noqa: E402
from tests.helpers import assert_same_fp4_decode_as_bnb  # noqa: E402

TENSOR_FIELDS = ("packed", "absmax", "code", "absmax_code", "absmax_scale", "absmax_offset")
# (out_features, in_features): in_features % 16 != 0 or a multiple of 64, so that bnb's AVX512 CPU
# dequantize kernel, which mis-indexes absmax when blocks span rows, is not involved (see
# tests/helpers.py::bnb_dequantize).
SHAPES = [(32, 128), (7, 100), (3, 37), (1, 70)]


@pytest.fixture(autouse=True)
def _eager_bnb():
    """bnb's torch fallback kernels (odd row lengths) are torch.compile'd; eager keeps the tests fast."""
    with torch.compiler.set_stance("force_eager"):
        yield


def quantized_linear4bit(weight, double_quant=True, quant_storage=torch.uint8, bias=None):
    """A Linear4bit quantized by bnb itself from ``weight`` (its dtype becomes quant_state.dtype)."""
    out_features, in_features = weight.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compress_statistics=double_quant,
                               quant_type="nf4", quant_storage=quant_storage)
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4",
                                      quant_storage=quant_storage, module=module)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return module.to("cpu")


def assert_shares(nf4, packed, quant_state):
    assert nf4.packed.data_ptr() == packed.data_ptr()
    assert nf4.absmax.data_ptr() == quant_state.absmax.data_ptr()
    assert nf4.code.data_ptr() == quant_state.code.data_ptr()
    if quant_state.state2 is not None:
        assert nf4.absmax_scale.data_ptr() == quant_state.state2.absmax.data_ptr()
        assert nf4.absmax_code.data_ptr() == quant_state.state2.code.data_ptr()
        assert nf4.absmax_offset.data_ptr() == quant_state.offset.data_ptr()


def assert_same_nf4(a, b):
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert (a.shape, a.dtype, a.blocksize, a.nested_blocksize) == (b.shape, b.dtype, b.blocksize, b.nested_blocksize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_from_linear4bit_and_params4bit_share_storage(shape, dtype, double_quant):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    module = quantized_linear4bit(weight, double_quant)
    expected = NF4Weight.quantize(weight, double_quant=double_quant)
    for obj in (module, module.weight):
        nf4 = nf4_from_bnb(obj)
        assert_same_nf4(nf4, expected)
        assert_shares(nf4, module.weight.data, module.weight.quant_state)
        assert torch.equal(nf4.dequantize(), F.dequantize_4bit(module.weight.data, module.weight.quant_state))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_from_pair_with_any_quant_storage_views_without_copy(quant_storage):
    weight = torch.randn(8, 128)  # 512 packed bytes: a whole number of 2- and 4-byte storage units
    packed, quant_state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True,
                                          quant_storage=quant_storage)
    assert packed.dtype == quant_storage
    nf4 = nf4_from_bnb((packed, quant_state))
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.shape == (512, 1)
    assert_shares(nf4, packed, quant_state)
    assert_same_nf4(nf4, NF4Weight.quantize(weight))
    assert torch.equal(nf4.dequantize(), F.dequantize_4bit(packed, quant_state))
    # A Linear4bit with that quant_storage gives the same NF4 data.
    module = quantized_linear4bit(weight, quant_storage=quant_storage)
    assert module.weight.dtype == quant_storage
    assert_same_nf4(nf4_from_bnb(module), nf4)


@pytest.mark.parametrize("shape", SHAPES + [(5,), (2, 3, 50)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_to_bnb_round_trip_shares_and_decodes_identically(shape, double_quant):
    nf4 = NF4Weight.quantize(torch.randn(shape).bfloat16(), double_quant=double_quant)
    params, quant_state = nf4_to_bnb(nf4)
    assert isinstance(params, bnb.nn.Params4bit) and isinstance(quant_state, F.QuantState)
    assert not params.requires_grad and params.bnb_quantized and params.quant_type == "nf4"
    assert params.quant_state is quant_state and params.blocksize == 64
    assert params.compress_statistics == double_quant and quant_state.nested == double_quant
    assert quant_state.dtype == torch.bfloat16 and quant_state.shape == torch.Size(shape)
    assert_shares(nf4, params.data, quant_state)
    decoded = F.dequantize_4bit(params.data, quant_state)
    assert torch.equal(decoded.reshape(shape), nf4.dequantize())
    back = nf4_from_bnb(params)
    assert_same_nf4(back, nf4)
    assert_shares(back, nf4.packed, quant_state)
    assert_same_nf4(nf4_from_bnb((params.data, quant_state)), nf4)
    # bnb's own serialisation of that QuantState is ours.
    ours = nf4.state_dict(prefix="w")
    for key, value in quant_state.as_dict(packed=True).items():
        assert torch.equal(value, ours[f"w.{key}"]), key


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dicts_cross_in_both_directions(double_quant, dtype):
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 100).to(dtype), torch.randn(32).to(dtype)
    original = quantized_linear4bit(weight, double_quant, bias=bias)
    x = torch.randn(5, 100).to(dtype)
    original.train()  # bnb's CPU eval path would repack the weight for its own inference kernel
    expected_out = original(x)
    bnb_sd = original.state_dict()

    # bnb -> ours
    nf4 = NF4Weight.from_state_dict(bnb_sd)
    assert_same_nf4(nf4, nf4_from_bnb(original))
    assert torch.equal(nf4.dequantize(), F.dequantize_4bit(original.weight.data, original.weight.quant_state))
    assert torch.equal(expected_out, torch.nn.functional.linear(x, nf4.dequantize(), bias))

    # ours -> a fresh Linear4bit. bnb 0.50's Linear4bit.load_state_dict does not restore a
    # quant_state (it reports the quant-state keys as unexpected, for bnb's own state dicts too);
    # checkpoints are loaded with Params4bit.from_prequantized, as transformers does.
    ours = nf4.state_dict()
    fresh = bnb.nn.Linear4bit(100, 32, bias=True, compress_statistics=double_quant, quant_type="nf4")
    fresh.weight = bnb.nn.Params4bit.from_prequantized(
        ours["weight"], {k: v for k, v in ours.items() if k != "weight"}, device="cpu", module=fresh)
    fresh.load_state_dict({"bias": bias}, strict=False)
    assert torch.equal(F.dequantize_4bit(fresh.weight.data, fresh.weight.quant_state), nf4.dequantize())
    fresh.train()
    assert torch.equal(fresh(x), expected_out)
    fresh_sd = fresh.state_dict()
    assert list(fresh_sd) == list(bnb_sd)
    for key in bnb_sd:
        assert torch.equal(fresh_sd[key], bnb_sd[key]), key

    # ... and through linear4bit_from_nf4, which shares our tensors.
    module = linear4bit_from_nf4(nf4, bias=bias)
    module.train()
    assert torch.equal(module(x), expected_out)
    assert module.weight.data.data_ptr() == nf4.packed.data_ptr() and module.bias.data_ptr() == bias.data_ptr()
    assert not module.weight.requires_grad and not module.bias.requires_grad
    module_sd = module.state_dict()
    assert list(module_sd) == list(bnb_sd)
    for key in bnb_sd:
        assert torch.equal(module_sd[key], bnb_sd[key]), key


def test_linear4bit_from_nf4_without_bias_and_errors():
    nf4 = NF4Weight.quantize(torch.randn(6, 20))
    module = linear4bit_from_nf4(nf4)
    assert module.bias is None and (module.out_features, module.in_features) == (6, 20)
    assert module.quant_state is module.weight.quant_state and module.weight.module is module
    x = torch.randn(3, 20)
    module.train()
    assert torch.equal(module(x), x @ nf4.dequantize().t())
    with pytest.raises(ValueError, match=r"must be 2-D \[out_features, in_features\], got shape \(120,\)"):
        linear4bit_from_nf4(NF4Weight.quantize(torch.randn(120)))
    with pytest.raises(ValueError, match=r"bias must have shape \[6\], got \[5\]"):
        linear4bit_from_nf4(nf4, bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"bias must be on the weight's device cpu, got meta"):
        linear4bit_from_nf4(nf4, bias=torch.zeros(6, device="meta"))
    with pytest.raises(TypeError, match=r"nf4 must be an NF4Weight"):
        linear4bit_from_nf4(torch.zeros(6, 20))
    with pytest.raises(TypeError, match=r"nf4 must be an NF4Weight"):
        nf4_to_bnb(torch.zeros(6, 20))


def test_nf4_from_bnb_errors():
    weight = torch.randn(32, 64)
    for obj in (weight, "weight", None, (weight,), (weight, "state", 3), ("packed", object())):
        with pytest.raises(TypeError):
            nf4_from_bnb(obj)
    with pytest.raises(TypeError, match=r"expects a bitsandbytes Params4bit, Linear4bit or \(packed, QuantState\)"):
        nf4_from_bnb(torch.nn.Linear(4, 4))

    other = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    other.weight.quant_state.quant_type = "int4"  # a type bnb may add: named, not misread
    for obj in (other, other.weight, (other.weight.data, other.weight.quant_state)):
        with pytest.raises(ValueError, match=r"unsupported quant type 'int4'"):
            nf4_from_bnb(obj)

    not_quantized = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    with pytest.raises(ValueError, match=r"not quantized yet"):
        nf4_from_bnb(not_quantized)


@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_linear4bit_round_trips_without_copies(double_quant):
    """bnb's FP4 (transformers' default bnb_4bit_quant_type): read without copies (but the 16-value
    table), decoded bit for bit as bnb's kernel decodes it, and handed back to bnb as FP4."""
    module = bnb.nn.Linear4bit(128, 24, bias=False, compress_statistics=double_quant, quant_type="fp4")
    module.weight = bnb.nn.Params4bit(torch.randn(24, 128), requires_grad=False, compress_statistics=double_quant,
                                      quant_type="fp4", module=module)
    module = module.to("cpu")
    fp4 = nf4_from_bnb(module)
    state = module.weight.quant_state
    assert fp4.quant_type == "fp4" and fp4.packed.data_ptr() == module.weight.data.data_ptr()
    assert fp4.absmax.data_ptr() == state.absmax.data_ptr()
    theirs = bnb.functional.dequantize_4bit(module.weight.data, state)
    assert_same_fp4_decode_as_bnb(fp4.dequantize(), theirs)
    params, back_state = nf4_to_bnb(fp4)
    assert back_state.quant_type == params.quant_type == "fp4"
    assert torch.equal(bnb.functional.dequantize_4bit(params.data, back_state), theirs)
    rebuilt = linear4bit_from_nf4(fp4)
    assert rebuilt.weight.quant_type == "fp4" and torch.equal(nf4_from_bnb(rebuilt).dequantize(), fp4.dequantize())


def test_module_quant_state_is_used_when_the_parameter_lost_it():
    module = quantized_linear4bit(torch.randn(8, 64))
    expected = nf4_from_bnb(module)
    module.weight.quant_state = None  # as after FSDP flattening; bnb keeps module.quant_state
    assert_same_nf4(nf4_from_bnb(module), expected)


@pytest.mark.skipif(not F.has_avx512bf16(), reason="bnb repacks CPU weights only with AVX512-BF16")
def test_cpu_inference_repacked_weight_is_rejected():
    module = quantized_linear4bit(torch.randn(32, 128))
    nf4 = nf4_from_bnb(module)
    before = nf4.dequantize().clone()
    module.eval()
    with torch.no_grad():
        module(torch.randn(2, 128))
    assert module.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match=r"packing_format_for_cpu"):
        nf4_from_bnb(module)
    # bnb replaced the module's tensors instead of writing into ours.
    assert torch.equal(nf4.dequantize(), before)


def test_quant_state_copy_with_other_nested_blocksize_decodes_like_bnb():
    """Read from the QuantState, not assumed: a (hand-made) nested block size of 128 decodes as bnb does."""
    weight = torch.randn(40, 1000)
    absmax = NF4Weight.quantize(weight, double_quant=False).absmax
    packed, quant_state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=False)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=128)
    nested = copy.copy(quant_state)
    nested.absmax, nested.offset, nested.state2, nested.nested = qabsmax, offset, state2, True
    nf4 = nf4_from_bnb((packed, nested))
    assert nf4.nested_blocksize == 128 and nf4.absmax_scale.shape == (-(-625 // 128),)
    assert torch.equal(nf4.dequantize(), F.dequantize_4bit(packed, nested))


def test_quant_state_with_another_nested_code_table_decodes_like_bnb(backend):
    """Read from the QuantState, not assumed: a second-level code table other than today's (bitsandbytes
    0.48's CPU quantizer wrote another one, and a checkpoint keeps the one it was written with) decodes
    as bnb decodes it, in NF4Weight.dequantize and inside the fused layer's kernels, forward and dX."""
    import lora_kernels
    from tests.helpers import BOUNDS, rel_err
    g = torch.Generator().manual_seed(3)
    N, K, r, scale = 40, 128, 4, 0.5
    packed, quant_state = F.quantize_4bit(torch.randn(N, K, generator=g), quant_type="nf4", compress_statistics=True)
    other = copy.copy(quant_state)
    other.state2 = copy.copy(quant_state.state2)
    other.state2.code = quant_state.state2.code * 0.97 + 0.002
    expected = F.dequantize_4bit(packed, other)
    assert not torch.equal(expected, F.dequantize_4bit(packed, quant_state))  # the table changes the weight
    nf4 = nf4_from_bnb((packed, other))
    assert torch.equal(nf4.dequantize(), expected)
    x_cpu = torch.randn(5, K, generator=g)
    A, B, dy = torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g), torch.randn(5, N, generator=g)
    device = backend.device  # the quantizer and the reference run on the CPU, the layer on the backend's device
    x = x_cpu.to(device).requires_grad_(True)
    y = lora_kernels.nf4_lora_linear(x, nf4.to(device), A.to(device), B.to(device), scale)
    y.backward(dy.to(device))
    assert backend.impls("fwd") == [backend.impl] and backend.impls("bwd") == [backend.impl]
    W, x64 = expected.double(), x_cpu.double()
    ref_y = x64 @ W.t() + scale * (x64 @ A.double().t()) @ B.double().t()
    ref_dx = dy.double() @ W + scale * (dy.double() @ B.double()) @ A.double()
    assert rel_err(y, ref_y) < BOUNDS[torch.float32] and rel_err(x.grad, ref_dx) < BOUNDS[torch.float32]


def test_importing_lora_kernels_does_not_import_bitsandbytes():
    code = ("import sys, lora_kernels, lora_kernels.ops.nf4, lora_kernels.integrations.bitsandbytes; "
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
