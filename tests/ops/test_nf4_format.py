"""The NF4 format (``lora_kernels.ops.nf4``) against bitsandbytes on CPU, byte for byte: quantized
bytes and scales (hypothesis over shapes, dtypes, block sizes, double quant, varied magnitudes, plus
hand-built zero blocks and exact ties), dequantization, absmax decoding, bnb Linear4bit state_dict
keys and values, round trips, empty weights, and every validation error."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lora_kernels.ops.nf4 import (FP4_CODE, NESTED_BLOCKSIZE, NF4_CODE, SUPPORTED_BLOCKSIZES, NF4Weight,
                                  _quantize_absmax, decode_absmax, dequantize_nf4_reference, dynamic_map)
from tests.helpers import assert_same_fp4_decode_as_bnb, bnb_dequantize, float_bits

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(weight, blocksize, double_quant, quant_type="nf4"):
    return bnb_functional().quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                          compress_statistics=double_quant)


def make_weight(shape, dtype, seed, blocksize=64, zero_blocks=()):
    """Normal values whose per-block magnitude spans 1e-3..1e3 (so absmax, the double-quant offset
    and its nested scale all vary), with the listed blocks zeroed; never all zero."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    magnitude = 10 ** (torch.rand(n_blocks, generator=g) * 6 - 3)
    flat = torch.randn(numel, generator=g) * magnitude.repeat_interleave(blocksize)[:numel]
    for block in zero_blocks:
        flat[block * blocksize:(block + 1) * blocksize] = 0
    if numel and not flat.any():
        flat[-1] = 1.5
    return flat.reshape(shape).to(dtype)


def assert_same_as_bnb(nf4, packed, quant_state):
    assert torch.equal(nf4.packed, packed) and nf4.packed.dtype == torch.uint8
    assert torch.equal(nf4.absmax, quant_state.absmax) and nf4.absmax.dtype == quant_state.absmax.dtype
    assert torch.equal(nf4.code, quant_state.code)
    assert nf4.shape == tuple(quant_state.shape) and nf4.dtype == quant_state.dtype
    assert nf4.blocksize == quant_state.blocksize
    assert nf4.double_quant == (quant_state.state2 is not None)
    if nf4.double_quant:
        assert torch.equal(nf4.absmax_scale, quant_state.state2.absmax)
        assert torch.equal(nf4.absmax_code, quant_state.state2.code)
        assert nf4.nested_blocksize == quant_state.state2.blocksize
        assert nf4.absmax_offset.shape == quant_state.offset.shape == ()
        assert torch.equal(nf4.absmax_offset, quant_state.offset) or (
            nf4.absmax_offset.isnan() and quant_state.offset.isnan())  # empty weight: mean([]) = NaN
    else:
        assert nf4.absmax_code is None and nf4.absmax_scale is None and nf4.absmax_offset is None


def codes_of(nf4):
    """The 4-bit codes, decoded independently of the module: int64 [numel]."""
    flat = nf4.packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:nf4.numel]


# ---------------------------------------------------------------------------------------------
# Constant tables
# ---------------------------------------------------------------------------------------------
def test_nf4_code_and_dynamic_map_match_bnb_bitwise():
    F = bnb_functional()
    bnb_nf4 = F.get_4bit_type("nf4", device="cpu")
    ours = torch.tensor(NF4_CODE, dtype=torch.float32)
    assert isinstance(NF4_CODE, tuple) and len(NF4_CODE) == 16
    assert torch.equal(ours.view(torch.int32), bnb_nf4.view(torch.int32))
    assert [float(v) for v in bnb_nf4] == list(NF4_CODE)  # the literals are the exact fp32 values
    bnb_dynamic = F.create_dynamic_map()
    assert torch.equal(dynamic_map().view(torch.int32), bnb_dynamic.view(torch.int32))
    copy_ = dynamic_map()
    copy_.zero_()  # callers get a copy; the cached table is untouched
    assert torch.equal(dynamic_map(), bnb_dynamic)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize / decode_absmax against bnb
# ---------------------------------------------------------------------------------------------
def shapes():
    dim = st.integers(1, 300)
    return st.one_of(
        st.tuples(st.integers(1, 3000)),                                   # 1-D, any numel
        st.tuples(st.integers(1, 40), dim),                                # 2-D, rows span blocks
        st.tuples(st.just(1), st.integers(1, 700)),                        # one row
        st.tuples(st.integers(1, 700), st.just(1)),                        # one column
        st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 40)),  # 3-D
        st.sampled_from([(64, 64), (2, 4096), (17, 256), (1, 1), (3, 5), (513, 8)]),
    )


@settings(max_examples=60, deadline=None)
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), double_quant=st.booleans(),
       blocksize=st.sampled_from((64, 64, 64) + SUPPORTED_BLOCKSIZES), seed=st.integers(0, 2**31),
       zero_block=st.integers(0, 60))
def test_quantize_and_dequantize_match_bnb(shape, dtype, double_quant, blocksize, seed, zero_block):
    weight = make_weight(shape, dtype, seed, blocksize, zero_blocks=(zero_block,))
    packed, quant_state = bnb_quantize(weight, blocksize, double_quant)
    nf4 = NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    assert_same_as_bnb(nf4, packed, quant_state)

    out = nf4.dequantize()
    assert out.dtype == dtype and out.shape == weight.shape
    assert torch.equal(out, bnb_dequantize(packed, quant_state))
    assert torch.equal(dequantize_nf4_reference(nf4), out)
    # One extra cast on request; the weight is decoded in its own dtype first, as bnb does.
    assert torch.equal(nf4.dequantize(torch.float64), out.double())
    if not double_quant:
        # Sanity, independent of bnb: each value is within half the widest NF4 gap (0.152) of its
        # block's absmax, plus the final rounding. (Double quant's decoded scales may be far off for
        # blocks much smaller than the mean, so there is no such bound there.)
        scale = nf4.absmax.repeat_interleave(blocksize)[:nf4.numel].double()
        err = (out.double() - weight.double()).reshape(-1).abs()
        assert (err <= 0.16 * scale).all()


@settings(max_examples=25, deadline=None)
@given(n_blocks=st.integers(1, 1500), seed=st.integers(0, 2**31))
def test_decode_absmax_matches_bnb(n_blocks, seed):
    F = bnb_functional()
    weight = make_weight((n_blocks * 64 - seed % 64,), torch.float32, seed)
    packed, quant_state = bnb_quantize(weight, 64, True)
    nf4 = NF4Weight.quantize(weight)
    expected = F.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    decoded = decode_absmax(nf4)
    assert decoded.dtype == torch.float32 and decoded.shape == (nf4.n_blocks,)
    assert torch.equal(decoded, expected)
    # The spec, spelled out: one fp32 rounding for the product, another for the offset.
    prod = nf4.absmax_code[nf4.absmax.long()] * nf4.absmax_scale.repeat_interleave(256)[:nf4.n_blocks]
    assert torch.equal(decoded, prod + nf4.absmax_offset)
    plain = NF4Weight.quantize(weight, double_quant=False)
    assert decode_absmax(plain) is plain.absmax


def test_double_quant_of_equal_absmax_blocks_uses_code_zero():
    """All absmax equal -> absmax - offset is all zeros: bnb's CPU quantizer writes code 0 (whose map
    value is -0.99297, not 0) with a zero nested scale, which decodes back to exactly offset."""
    weight = torch.tensor([1.0, -0.5, 0.25] * 64).reshape(3, 64)  # every block's absmax is 1
    packed, quant_state = bnb_quantize(weight, 64, True)
    nf4 = NF4Weight.quantize(weight)
    assert_same_as_bnb(nf4, packed, quant_state)
    assert nf4.absmax.tolist() == [0, 0, 0] and nf4.absmax_scale.tolist() == [0.0]
    assert decode_absmax(nf4).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_blocks_whole_and_partial(dtype):
    """A whole zero block keeps absmax 0; a zero partial last block stores the clamp value 1e-38.
    Both encode as code 7 (0.0) and decode to exact zeros."""
    weight = torch.randn(64 * 3 + 10).to(dtype)
    weight[64:128] = 0
    weight[192:] = 0
    for double_quant in (False, True):
        packed, quant_state = bnb_quantize(weight, 64, double_quant)
        nf4 = NF4Weight.quantize(weight, double_quant=double_quant)
        assert_same_as_bnb(nf4, packed, quant_state)
        assert (codes_of(nf4)[64:128] == 7).all() and (codes_of(nf4)[192:] == 7).all()
        assert (nf4.dequantize()[64:128] == 0).all() and (nf4.dequantize()[192:] == 0).all()
        assert torch.equal(nf4.dequantize(), bnb_dequantize(packed, quant_state))
    plain = NF4Weight.quantize(weight, double_quant=False)
    assert plain.absmax[1].item() == 0.0
    assert plain.absmax[3].item() == torch.tensor(1e-38).item()


@pytest.mark.parametrize("absmax", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("partial", [False, True])
def test_exact_ties_take_the_lower_code(absmax, partial):
    """Values exactly on an NF4 midpoint (scaled by a power-of-two absmax, so scaling is exact) go to
    the lower code, their upper fp32 neighbours to the upper one. The last block is partial when
    ``partial`` (bnb scales it by a true division instead of the reciprocal product)."""
    bounds = (torch.tensor(NF4_CODE[:-1]) + torch.tensor(NF4_CODE[1:])) / 2
    ties = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0))])
    block = torch.cat([torch.tensor([-1.0]), ties, torch.zeros(64 - 1 - ties.numel())]) * absmax
    weight = torch.cat([block, block[:50] if partial else block])
    for double_quant in (False, True):
        packed, quant_state = bnb_quantize(weight, 64, double_quant)
        nf4 = NF4Weight.quantize(weight, double_quant=double_quant)
        assert_same_as_bnb(nf4, packed, quant_state)
        assert torch.equal(nf4.dequantize(), bnb_dequantize(packed, quant_state))
    codes = codes_of(NF4Weight.quantize(weight, double_quant=False))
    lower = torch.arange(15)
    for start in (0, 64):  # block layout: -absmax, 15 midpoints, 15 one ulp above, 15 one ulp below
        assert codes[start] == 0
        assert torch.equal(codes[start + 1:start + 16], lower)
        assert torch.equal(codes[start + 16:start + 31], lower + 1)
        assert torch.equal(codes[start + 31:start + 46], lower)


def reciprocal_vs_division_cases(count):
    """``count`` (absmax, x) fp32 pairs for which ``x * fl(1 / absmax)`` and ``x / absmax`` fall on
    different sides of an NF4 midpoint, found by searching around midpoint * absmax."""
    g = torch.Generator().manual_seed(11)
    bounds = (torch.tensor(NF4_CODE[:-1]) + torch.tensor(NF4_CODE[1:])) / 2
    absmax = (1 + torch.rand(20000, generator=g)).repeat(3)
    near = (bounds[torch.randint(15, (20000,), generator=g)] * absmax[:20000]).repeat(3)
    x = torch.cat([near[:20000], torch.nextafter(near[:20000], torch.tensor(9.0)),
                   torch.nextafter(near[:20000], torch.tensor(-9.0))])
    differ = torch.bucketize(x * (1.0 / absmax), bounds) != torch.bucketize(x / absmax, bounds)
    assert differ.sum() >= count
    return absmax[differ][:count], x[differ][:count]


@pytest.mark.parametrize("double_quant", [False, True])
def test_whole_blocks_scale_by_reciprocal_and_the_partial_block_divides(double_quant):
    """bnb scales whole blocks by ``x * (1 / absmax)`` but the partial last block by ``x / absmax``;
    on these inputs the two roundings pick different codes."""
    absmax, x = reciprocal_vs_division_cases(21)
    blocks = torch.zeros(21, 64)
    blocks[:, 0], blocks[:, 1] = absmax, x
    weight = torch.cat([blocks[:20].reshape(-1), blocks[20, :2]])  # 20 whole blocks, a partial one of 2
    packed, quant_state = bnb_quantize(weight, 64, double_quant)
    nf4 = NF4Weight.quantize(weight, double_quant=double_quant)
    assert_same_as_bnb(nf4, packed, quant_state)
    bounds = (torch.tensor(NF4_CODE[:-1]) + torch.tensor(NF4_CODE[1:])) / 2
    codes = codes_of(nf4)
    assert torch.equal(codes[1::64][:20], torch.bucketize(x[:20] * (1.0 / absmax[:20]), bounds))
    assert codes[-1] == torch.bucketize(x[20] / absmax[20], bounds)


def lut_boundary_values():
    """Values whose scaled form sits on, or one ulp beside, the boundaries of bnb's 65536-point CPU
    lookup grid, near 0 (where the grid is coarser than the dynamic map) and random ones."""
    k = torch.arange(0, 65535, 37, dtype=torch.float64)
    edges = ((k + 0.5) / 65535 * 2 - 1).float()
    grid_points = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)),
                             torch.nextafter(edges, torch.tensor(-2.0))])
    near_zero = torch.linspace(-1e-4, 1e-4, 255)
    values = torch.cat([grid_points, near_zero, torch.randn(3000, generator=torch.Generator().manual_seed(3))])
    blocks = torch.nn.functional.pad(values, (0, (-values.numel()) % 255)).view(-1, 255)
    # Each block of 256 gets a leading 1.0 so its scale is exactly 1 and the values are not rescaled.
    return torch.cat([torch.ones(blocks.shape[0], 1), blocks], 1).reshape(-1)


@pytest.mark.parametrize("case", ["lut_boundaries", "zero_blocks", "partial_block", "tiny", "huge", "subnormal"])
def test_absmax_quantizer_matches_bnb_quantize_blockwise(case):
    """The double-quant quantizer alone against bnb's native CPU quantize_blockwise (blocksize 256,
    dynamic map): a LUT over [-1, 1], not the exact nearest code."""
    F = bnb_functional()
    g = torch.Generator().manual_seed(7)
    x = {"lut_boundaries": lut_boundary_values(),
         "zero_blocks": torch.cat([torch.zeros(512), torch.randn(300, generator=g), torch.zeros(7)]),
         "partial_block": torch.randn(1000, generator=g) * 3,
         "tiny": torch.randn(700, generator=g) * 1e-30,
         "huge": torch.randn(700, generator=g) * 1e30,
         # subnormal scales: their fp32 inverse is inf, and x * inf saturates
         "subnormal": torch.randn(700, generator=g) * 1e-41}[case]
    expected_codes, state = F.quantize_blockwise(x, blocksize=256)
    codes, scales = _quantize_absmax(x, 256)
    assert torch.equal(scales, state.absmax)
    assert torch.equal(codes, expected_codes)
    if case == "lut_boundaries":
        exact_nearest = (x[:, None] - dynamic_map()[None]).abs().argmin(1)
        assert (codes.long() != exact_nearest).any()  # the LUT rule is really exercised


@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0), (2, 0, 5)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_weight_matches_bnb(shape, double_quant):
    """Empty weights are supported: empty tensors, and with double quant offset = mean([]) = NaN,
    exactly what bnb produces (and writes as NaN in its JSON)."""
    weight = torch.empty(shape, dtype=torch.bfloat16)
    packed, quant_state = bnb_quantize(weight, 64, double_quant)
    nf4 = NF4Weight.quantize(weight, double_quant=double_quant)
    assert_same_as_bnb(nf4, packed, quant_state)
    assert nf4.packed.shape == (0, 1) and nf4.n_blocks == 0 and nf4.numel == 0
    assert nf4.dequantize().shape == shape and nf4.dequantize().dtype == torch.bfloat16
    assert math.isnan(nf4.bits_per_parameter)
    assert nf4.state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist() == \
        quant_state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist()
    back = NF4Weight.from_state_dict(nf4.state_dict())
    assert back.shape == shape and back.double_quant == double_quant


def test_quantize_odd_numel_pads_low_nibble_with_code_7():
    weight = torch.tensor([1.0, -1.0, 0.5, 0.25, -0.75])
    packed, _ = bnb_quantize(weight, 64, False)
    nf4 = NF4Weight.quantize(weight, double_quant=False)
    assert torch.equal(nf4.packed, packed)
    assert nf4.packed.shape == (3, 1) and (nf4.packed[-1, 0] & 15).item() == 7
    assert (nf4.packed[0, 0] >> 4).item() == 15 and (nf4.packed[0, 0] & 15).item() == 0  # high nibble first


def test_quantize_non_contiguous_and_grad_inputs():
    base = torch.randn(96, 80, requires_grad=True)
    weight = base.t()[:, ::2]  # non-contiguous view of a leaf that requires grad
    nf4 = NF4Weight.quantize(weight)
    packed, quant_state = bnb_quantize(weight.detach().contiguous(), 64, True)
    assert_same_as_bnb(nf4, packed, quant_state)
    assert not nf4.packed.requires_grad and not nf4.dequantize().requires_grad


# ---------------------------------------------------------------------------------------------
# Properties and small API
# ---------------------------------------------------------------------------------------------
def test_properties_and_repr():
    nf4 = NF4Weight.quantize(torch.randn(256, 1024, dtype=torch.bfloat16))
    numel, n_blocks = 256 * 1024, 256 * 1024 // 64
    assert (nf4.numel, nf4.n_blocks, nf4.double_quant, nf4.device) == (numel, n_blocks, True, torch.device("cpu"))
    expected_bytes = numel // 2 + n_blocks + 4 * (n_blocks // 256) + 4 * 16 + 4 * 256 + 4
    assert nf4.nbytes == expected_bytes
    assert nf4.bits_per_parameter == 8 * expected_bytes / numel
    tables = 4 * 16 + 4 * 256 + 4  # code, absmax_code, offset: a constant, not a per-parameter cost
    assert 8 * (nf4.nbytes - tables) / numel == 4 + 8 / 64 + 32 / (64 * 256)  # 4.127
    plain = NF4Weight.quantize(torch.randn(256, 1024), double_quant=False)
    assert not plain.double_quant and plain.nbytes == numel // 2 + 4 * n_blocks + 4 * 16
    assert 8 * (plain.nbytes - 4 * 16) / numel == 4.5
    text = repr(nf4)
    assert "shape=(256, 1024)" in text and "bfloat16" in text and "blocksize=64" in text and "double_quant=True" in text


def test_to_same_device_shares_and_meta_moves():
    nf4 = NF4Weight.quantize(torch.randn(10, 70))
    same = nf4.to("cpu")
    for name in ("packed", "absmax", "code", "absmax_code", "absmax_scale", "absmax_offset"):
        assert getattr(same, name).data_ptr() == getattr(nf4, name).data_ptr()
    meta = nf4.to("meta")
    assert meta.device.type == "meta" and meta.shape == nf4.shape and meta.double_quant
    assert meta.absmax_offset.device.type == "meta"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_subnormal_weights_match_bnb(quant_type):
    """Block absmax values that are fp32 subnormals (their nested scale's inverse is inf)."""
    F = bnb_functional()
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 1e-40
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    nf4 = NF4Weight.quantize(w, quant_type=quant_type)
    assert torch.equal(nf4.packed.view(-1), packed.view(-1)) and torch.equal(nf4.absmax, state.absmax)
    assert torch.equal(nf4.absmax_scale, state.state2.absmax)
    assert torch.equal(nf4.dequantize(), bnb_dequantize(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
def test_meta_weight_state_dict_has_the_keys(double_quant):
    """A meta weight (a model built on meta before loading) lists the same keys, every tensor on meta."""
    nf4 = NF4Weight.quantize(torch.randn(10, 70), double_quant=double_quant)
    meta = nf4.to("meta").state_dict()
    assert list(meta) == list(nf4.state_dict())
    assert all(t.device.type == "meta" for t in meta.values())


def test_constructor_accepts_flat_packed_and_one_element_offset():
    nf4 = NF4Weight.quantize(torch.randn(7, 9))
    again = NF4Weight(nf4.packed.reshape(-1), nf4.absmax, [7, 9], torch.float32, 64, code=nf4.code,
                      absmax_code=nf4.absmax_code, absmax_scale=nf4.absmax_scale,
                      absmax_offset=nf4.absmax_offset.reshape(1))
    assert again.packed.shape == (32, 1) and again.packed.data_ptr() == nf4.packed.data_ptr()
    assert again.absmax_offset.shape == () and again.shape == (7, 9)
    assert torch.equal(again.dequantize(), nf4.dequantize())


# ---------------------------------------------------------------------------------------------
# state_dict: bnb Linear4bit keys and values
# ---------------------------------------------------------------------------------------------
def bnb_linear4bit_state_dict(weight, blocksize, double_quant, quant_type="nf4"):
    bnb = pytest.importorskip("bitsandbytes")
    out_features, in_features = weight.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias=False, compress_statistics=double_quant,
                               quant_type=quant_type)
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                      compress_statistics=double_quant, quant_type=quant_type, module=module)
    return module.to("cpu").state_dict()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       double_quant=st.booleans(), blocksize=st.sampled_from((64, 32, 128, 4096)), seed=st.integers(0, 2**31))
def test_state_dict_matches_bnb_linear4bit(rows, cols, dtype, double_quant, blocksize, seed):
    weight = make_weight((rows, cols), dtype, seed, blocksize)
    expected = bnb_linear4bit_state_dict(weight, blocksize, double_quant)
    nf4 = NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    ours = nf4.state_dict()
    assert list(ours) == [k for k in expected if k != "bias"]  # same keys, in bnb's order
    for key, value in ours.items():
        assert value.dtype == expected[key].dtype and value.shape == expected[key].shape, key
        assert torch.equal(value, expected[key]), key
    blob = bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    fields = json.loads(blob)
    assert fields["dtype"] == str(dtype).removeprefix("torch.") and fields["shape"] == [rows, cols]
    assert fields["quant_type"] == "nf4" and fields["blocksize"] == blocksize

    back = NF4Weight.from_state_dict(ours)
    assert_same_as_bnb(back, nf4.packed, _as_quant_state_like(nf4))
    assert torch.equal(back.dequantize(), nf4.dequantize())
    from_bnb = NF4Weight.from_state_dict(expected)
    assert torch.equal(from_bnb.dequantize(), nf4.dequantize())


def _as_quant_state_like(nf4):
    """A duck-typed stand-in for a bnb QuantState built from an NF4Weight (no bnb needed)."""
    class State:
        pass
    state, nested = State(), State()
    state.absmax, state.code, state.shape, state.dtype = nf4.absmax, nf4.code, nf4.shape, nf4.dtype
    state.blocksize, state.quant_type, state.offset, state.state2 = nf4.blocksize, "nf4", nf4.absmax_offset, None
    if nf4.double_quant:
        nested.absmax, nested.code, nested.blocksize = nf4.absmax_scale, nf4.absmax_code, nf4.nested_blocksize
        state.state2 = nested
    return state


def test_state_dict_prefix_and_storage():
    nf4 = NF4Weight.quantize(torch.randn(6, 40))
    sd = nf4.state_dict(prefix="model.layers.0.q_proj.weight")
    assert set(sd) == {"model.layers.0.q_proj.weight", "model.layers.0.q_proj.weight.absmax",
                       "model.layers.0.q_proj.weight.quant_map", "model.layers.0.q_proj.weight.nested_absmax",
                       "model.layers.0.q_proj.weight.nested_quant_map",
                       "model.layers.0.q_proj.weight.quant_state.bitsandbytes__nf4"}
    assert sd["model.layers.0.q_proj.weight"].data_ptr() == nf4.packed.data_ptr()
    # Cloned like bnb, so that safetensors does not see one table stored under several names.
    assert sd["model.layers.0.q_proj.weight.nested_quant_map"].data_ptr() != nf4.absmax_code.data_ptr()
    back = NF4Weight.from_state_dict({**sd, "model.layers.0.q_proj.bias": torch.zeros(6)},
                                     prefix="model.layers.0.q_proj.weight")
    assert back.packed.data_ptr() == nf4.packed.data_ptr()
    assert torch.equal(back.absmax_offset, nf4.absmax_offset)


def test_from_state_dict_views_other_quant_storage():
    nf4 = NF4Weight.quantize(torch.randn(8, 64), double_quant=False)
    sd = nf4.state_dict()
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).unsqueeze(1)  # bnb quant_storage=bf16
    back = NF4Weight.from_state_dict(sd)
    assert back.packed.data_ptr() == nf4.packed.data_ptr() and torch.equal(back.packed, nf4.packed)


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts():
    nf4 = NF4Weight.quantize(torch.randn(5, 100))  # 500 elements, 8 blocks, 1 nested block
    return dict(packed=nf4.packed, absmax=nf4.absmax, shape=(5, 100), dtype=torch.float32, blocksize=64,
                code=nf4.code, absmax_code=nf4.absmax_code, absmax_scale=nf4.absmax_scale,
                absmax_offset=nf4.absmax_offset)


def _build(parts, **changes):
    args = {**parts, **changes}
    return NF4Weight(args.pop("packed"), args.pop("absmax"), args.pop("shape"), args.pop("dtype"),
                     args.pop("blocksize"), **args)


CONSTRUCTOR_ERRORS = {
    "packed_short": (lambda p: dict(packed=p["packed"][:-1]), ValueError, r"packed must have shape \[250, 1\]"),
    "packed_2cols": (lambda p: dict(packed=p["packed"].view(-1, 2)), ValueError, r"packed must have shape"),
    "packed_dtype": (lambda p: dict(packed=p["packed"].to(torch.int8)), ValueError,
                     r"packed must have dtype torch.uint8"),
    "packed_type": (lambda p: dict(packed=[1, 2]), TypeError, r"packed must be a torch.Tensor"),
    "absmax_length": (lambda p: dict(absmax=p["absmax"][:-1]), ValueError, r"absmax must have shape \[8\]"),
    "absmax_dtype": (lambda p: dict(absmax=p["absmax"].half()), ValueError, r"absmax must have dtype"),
    "blocksize_mismatch": (lambda p: dict(blocksize=128), ValueError, r"absmax must have shape \[4\]"),
    "blocksize_unsupported": (lambda p: dict(blocksize=48), ValueError, r"blocksize must be one of"),
    "blocksize_type": (lambda p: dict(blocksize=64.0), TypeError, r"blocksize must be an int"),
    "missing_scale": (lambda p: dict(absmax_scale=None), ValueError,
                      r"uint8 \(double-quantized\) but absmax_scale is None"),
    "missing_all_nested": (lambda p: dict(absmax_scale=None, absmax_code=None, absmax_offset=None), ValueError,
                           r"absmax_code, absmax_scale, absmax_offset are None"),
    "scale_length": (lambda p: dict(absmax_scale=torch.zeros(2)), ValueError, r"absmax_scale must have shape \[1\]"),
    "absmax_code_length": (lambda p: dict(absmax_code=torch.zeros(255)), ValueError,
                           r"absmax_code must have shape \[256\]"),
    "offset_shape": (lambda p: dict(absmax_offset=torch.zeros(2)), ValueError, r"absmax_offset must have shape \[\]"),
    "offset_dtype": (lambda p: dict(absmax_offset=torch.tensor(0.5, dtype=torch.float64)), ValueError,
                     r"absmax_offset must have dtype"),
    "nested_with_float_absmax": (
        lambda p: dict(absmax=torch.ones(8)), ValueError,
        r"float32 \(not double-quantized\) but absmax_code, absmax_scale, absmax_offset were given"),
    "nested_blocksize": (lambda p: dict(nested_blocksize=0), ValueError, r"nested_blocksize must be positive"),
    "code_length": (lambda p: dict(code=torch.zeros(15)), ValueError, r"code must have shape \[16\]"),
    "code_values": (lambda p: dict(code=p["code"].flip(0)), ValueError, r"code must be the NF4 or the FP4 table"),
    "code_of_other_type": (lambda p: dict(quant_type="fp4"), ValueError, r"code must be the FP4 table"),
    "quant_type": (lambda p: dict(quant_type="int4"), ValueError, r"unsupported quant type 'int4'"),
    "dtype_int": (lambda p: dict(dtype=torch.int8), ValueError, r"dtype must be one of"),
    "dtype_str": (lambda p: dict(dtype="float32"), TypeError, r"dtype must be a torch.dtype"),
    "shape_negative": (lambda p: dict(shape=(-5, -100)), ValueError, r"shape entries must be >= 0"),
    "shape_empty": (lambda p: dict(shape=()), ValueError, r"shape must have at least one dimension"),
    "shape_float": (lambda p: dict(shape=(5.0, 100)), TypeError, r"shape entries must be ints"),
    "shape_numel": (lambda p: dict(shape=(5, 101)), ValueError, r"packed must have shape \[253, 1\]"),
    "two_devices": (lambda p: dict(absmax_scale=p["absmax_scale"].to("meta")), ValueError,
                    r"one device: packed is on cpu, absmax_scale on meta"),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTOR_ERRORS))
def test_constructor_errors(parts, case):
    change, error, message = CONSTRUCTOR_ERRORS[case]
    _build(parts)  # the unmodified parts are valid
    with pytest.raises(error, match=message):
        _build(parts, **change(parts))


QUANTIZE_ERRORS = {
    "not_tensor": (lambda: NF4Weight.quantize([[1.0]]), TypeError, r"weight must be a torch.Tensor"),
    "int_weight": (lambda: NF4Weight.quantize(torch.ones(4, 4, dtype=torch.int32)), ValueError,
                   r"weight.dtype must be"),
    "float64_weight": (lambda: NF4Weight.quantize(torch.ones(4, dtype=torch.float64)), ValueError, r"weight.dtype"),
    "scalar": (lambda: NF4Weight.quantize(torch.tensor(1.0)), ValueError, r"at least one dimension"),
    "nan": (lambda: NF4Weight.quantize(torch.tensor([1.0, math.nan])), ValueError, r"NaN or Inf"),
    "inf": (lambda: NF4Weight.quantize(torch.tensor([1.0, -math.inf])), ValueError, r"NaN or Inf"),
    "blocksize": (lambda: NF4Weight.quantize(torch.ones(8), blocksize=100), ValueError, r"blocksize must be one of"),
    "quant_type": (lambda: NF4Weight.quantize(torch.ones(8), quant_type="int4"), ValueError,
                   r"unsupported quant type 'int4': 'nf4' or 'fp4' expected"),
    # bnb goes on with an inf offset and NaN scales
    "absmax_mean_overflows": (lambda: NF4Weight.quantize(torch.full((4, 64), 3e38)), ValueError,
                              r"too large for double quantization.*double_quant=False"),
    "dequantize_dtype": (lambda: NF4Weight.quantize(torch.ones(8)).dequantize(torch.int32), ValueError,
                         r"dtype must be a floating-point dtype, got torch.int32"),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_ERRORS))
def test_quantize_errors(case):
    call, error, message = QUANTIZE_ERRORS[case]
    with pytest.raises(error, match=message):
        call()


def _blob(fields):
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def _edit_json(sd, **changes):
    fields = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    fields.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del fields[key]
    return {**sd, "weight.quant_state.bitsandbytes__nf4": _blob(fields)}


def _drop(sd, key):
    return {k: v for k, v in sd.items() if k != key}


STATE_DICT_ERRORS = {
    "missing_weight": (lambda sd: _drop(sd, "weight"), ValueError, r"missing key 'weight'"),
    "missing_absmax": (lambda sd: _drop(sd, "weight.absmax"), ValueError, r"missing key 'weight.absmax'"),
    "missing_quant_map": (lambda sd: _drop(sd, "weight.quant_map"), ValueError, r"missing key 'weight.quant_map'"),
    "missing_nested_absmax": (lambda sd: _drop(sd, "weight.nested_absmax"), ValueError,
                              r"missing key 'weight.nested_absmax'"),
    "missing_nested_quant_map": (lambda sd: _drop(sd, "weight.nested_quant_map"), ValueError,
                                 r"missing key 'weight.nested_quant_map'"),
    "missing_blob": (lambda sd: _drop(sd, "weight.quant_state.bitsandbytes__nf4"), ValueError,
                     r"missing key 'weight.quant_state.bitsandbytes__nf4'"),
    "int4_blob": (lambda sd: {**_drop(sd, "weight.quant_state.bitsandbytes__nf4"),
                              "weight.quant_state.bitsandbytes__int4": sd["weight.quant_state.bitsandbytes__nf4"]},
                  ValueError, r"unsupported quant type 'int4'"),
    "fp4_key_nf4_json": (lambda sd: {**_drop(sd, "weight.quant_state.bitsandbytes__nf4"),
                                     "weight.quant_state.bitsandbytes__fp4": sd["weight.quant_state.bitsandbytes__nf4"]},
                         ValueError, r"field 'quant_type' is 'nf4', its key says 'fp4'"),
    "fp4_field": (lambda sd: _edit_json(sd, quant_type="fp4"), ValueError, r"field 'quant_type' is 'fp4', its key says"),
    "two_blobs": (lambda sd: {**sd, "weight.quant_state.bitsandbytes__fp4": sd["weight.quant_state.bitsandbytes__nf4"]},
                  ValueError, r"several quant states"),
    "bad_dtype": (lambda sd: _edit_json(sd, dtype="int8"), ValueError, r"field 'dtype' must be one of"),
    "missing_shape": (lambda sd: _edit_json(sd, shape=None), ValueError, r"missing field 'shape'"),
    "missing_offset": (lambda sd: _edit_json(sd, nested_offset=None), ValueError, r"missing field 'nested_offset'"),
    "bad_offset": (lambda sd: _edit_json(sd, nested_offset="0.5"), ValueError, r"'nested_offset' must be a number"),
    "bad_nested_dtype": (lambda sd: _edit_json(sd, nested_dtype="float16"), ValueError, r"'nested_dtype' must be"),
    "blocksize_mismatch": (lambda sd: _edit_json(sd, blocksize=128), ValueError, r"absmax must have shape"),
    "shape_mismatch": (lambda sd: _edit_json(sd, shape=[5, 99]), ValueError, r"packed must have shape"),
    "not_json": (lambda sd: {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor([255, 0], dtype=torch.uint8)},
                 ValueError, r"is not UTF-8 JSON"),
    "not_tensor": (lambda sd: {**sd, "weight.absmax": [1, 2]}, TypeError, r"state_dict\['weight.absmax'\] must be a"),
}


@pytest.mark.parametrize("case", sorted(STATE_DICT_ERRORS))
def test_from_state_dict_errors(case):
    sd = NF4Weight.quantize(torch.randn(5, 100)).state_dict()
    NF4Weight.from_state_dict(sd)  # valid as is
    change, error, message = STATE_DICT_ERRORS[case]
    with pytest.raises(error, match=message):
        NF4Weight.from_state_dict(change(sd))


def test_from_state_dict_wrong_prefix_names_key():
    sd = NF4Weight.quantize(torch.randn(4, 4)).state_dict()
    with pytest.raises(ValueError, match=r"missing key 'lm_head.weight.quant_state.bitsandbytes__nf4'"):
        NF4Weight.from_state_dict(sd, prefix="lm_head.weight")


def test_from_quant_state_errors():
    nf4 = NF4Weight.quantize(torch.randn(4, 64))
    state = _as_quant_state_like(nf4)
    assert torch.equal(NF4Weight.from_quant_state(nf4.packed, state).dequantize(), nf4.dequantize())
    state.quant_type = "fp4"  # with NF4's table
    with pytest.raises(ValueError, match=r"code must be the FP4 table"):
        NF4Weight.from_quant_state(nf4.packed, state)
    state.quant_type = "int4"
    with pytest.raises(ValueError, match=r"unsupported quant type 'int4'"):
        NF4Weight.from_quant_state(nf4.packed, state)
    with pytest.raises(TypeError, match=r"attribute 'absmax' missing"):
        NF4Weight.from_quant_state(nf4.packed, object())
    with pytest.raises(TypeError, match=r"packed must be a torch.Tensor"):
        NF4Weight.from_quant_state(None, _as_quant_state_like(nf4))
    state = _as_quant_state_like(nf4)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match=r"packing_format_for_cpu"):
        NF4Weight.from_quant_state(nf4.packed, state)


def test_nested_blocksize_default_and_module_constant():
    nf4 = NF4Weight.quantize(torch.randn(3, 300))
    assert nf4.nested_blocksize == NESTED_BLOCKSIZE == 256
    assert NF4Weight.quantize(torch.randn(3, 300), double_quant=False).nested_blocksize == 256


# ---------------------------------------------------------------------------------------------
# FP4 (bitsandbytes' other 4-bit type, transformers' default bnb_4bit_quant_type): the same format
# with another table
# ---------------------------------------------------------------------------------------------
def test_fp4_code_is_bnb_s_table_with_the_zero_its_kernels_decode():
    """FP4_CODE holds get_4bit_type("fp4")'s values (the literals are its exact fp32 values), and code 8 is
    -0.0, as bnb's CUDA kernel decodes it: sign * table[code & 7] (csrc/kernels.cu dDequantizeFP4Tree),
    though its quant_map says +0.0. bnb's CPU decode gives the same table, the zero's sign as the CPU
    has it (``bnb_cpu_decodes_fp4_negative_zero``)."""
    F = bnb_functional()
    bnb_fp4 = F.get_4bit_type("fp4", device="cpu")
    ours = torch.tensor(FP4_CODE, dtype=torch.float32)
    assert [abs(float(v)) for v in bnb_fp4] == [abs(v) for v in FP4_CODE] and torch.equal(ours, bnb_fp4)
    cuda_kernel = torch.tensor([(1.0 - 2 * ((v & 8) >> 3)) * abs(float(bnb_fp4[v & 7])) for v in range(16)])
    assert torch.equal(float_bits(ours), float_bits(cuda_kernel))
    assert torch.signbit(ours[8]) and not torch.signbit(bnb_fp4[8])
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)  # every code, 64 values: one block
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    _, state = bnb_quantize(torch.ones(1, 64), 64, False, "fp4")
    decoded = F.dequantize_4bit(packed, state).reshape(-1)[:16]  # absmax 1: the table itself
    assert_same_fp4_decode_as_bnb(ours, decoded)
    weight = NF4Weight(packed, state.absmax, (1, 64), torch.float32, code=state.code)
    assert weight.quant_type == "fp4" and torch.equal(float_bits(weight.code), float_bits(ours))  # the zero's sign fixed
    assert torch.equal(float_bits(weight.dequantize().reshape(-1)[:16]), float_bits(ours))


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), double_quant=st.booleans(),
       blocksize=st.sampled_from((64, 64) + SUPPORTED_BLOCKSIZES), seed=st.integers(0, 2**31),
       zero_block=st.integers(0, 60))
def test_fp4_quantize_and_dequantize_match_bnb(shape, dtype, double_quant, blocksize, seed, zero_block):
    """Bytes and scales as bnb's CPU quantize_4bit(quant_type="fp4"), its tiny values included (|x| up to
    0.0026 absmax: codes 0 and 8); decoded bit for bit as bnb's native kernel does. bnb decodes a
    weight whose last dimension is odd with its torch fallback, which reads code 8 from the quant_map
    as +0.0: the same values, a zero's sign apart."""
    weight = make_weight(shape, dtype, seed, blocksize, zero_blocks=(zero_block,))
    weight.view(-1)[::5] *= 1e-4
    packed, quant_state = bnb_quantize(weight, blocksize, double_quant, "fp4")
    fp4 = NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type="fp4")
    assert fp4.quant_type == "fp4"
    assert_same_as_bnb(fp4, packed, quant_state)
    out, theirs = fp4.dequantize(), bnb_dequantize(packed, quant_state)
    assert out.dtype == dtype and out.shape == weight.shape and torch.equal(out, theirs)
    assert torch.equal(float_bits(dequantize_nf4_reference(fp4)), float_bits(out))
    assert_same_fp4_decode_as_bnb(out, theirs, bnb_native=weight.numel() and weight.shape[-1] % 2 == 0
                                  and len(shape) <= 2)


def test_fp4_ties_and_tiny_values_take_bnb_s_codes():
    """Values exactly on a midpoint of the sorted FP4 values go to the lower value, one ulp above to the
    upper; bnb sorts the two zeros as codes 0, 8: (0, 0.0026] takes code 8, [-0.0026, 0] code 0."""
    values = torch.tensor(sorted(FP4_CODE))
    bounds = (values[:-1] + values[1:]) / 2
    ties = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0)),
                      torch.tensor([1e-6, -1e-6, 0.0])])
    block = torch.cat([torch.tensor([-1.0]), ties, torch.zeros(64 - 1 - ties.numel())])
    weight = torch.cat([block, block[:50]])  # a whole block and a partial one (a true division)
    for double_quant in (False, True):
        packed, quant_state = bnb_quantize(weight, 64, double_quant, "fp4")
        fp4 = NF4Weight.quantize(weight, double_quant=double_quant, quant_type="fp4")
        assert_same_as_bnb(fp4, packed, quant_state)
    codes = codes_of(NF4Weight.quantize(weight, double_quant=False, quant_type="fp4"))
    assert codes[1 + 45:1 + 48].tolist() == [8, 0, 0]  # +1e-6, -1e-6, 0.0


def test_fp4_odd_numel_pads_with_code_0():
    weight = torch.tensor([1.0, -1.0, 0.5, 0.25, -0.75])
    packed, _ = bnb_quantize(weight, 64, False, "fp4")
    fp4 = NF4Weight.quantize(weight, double_quant=False, quant_type="fp4")
    assert torch.equal(fp4.packed, packed) and (fp4.packed[-1, 0] & 15).item() == 0


@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_state_dict_matches_bnb_linear4bit(double_quant):
    weight = make_weight((24, 130), torch.bfloat16, 7)
    expected = bnb_linear4bit_state_dict(weight, 64, double_quant, "fp4")
    fp4 = NF4Weight.quantize(weight, double_quant=double_quant, quant_type="fp4")
    ours = fp4.state_dict()
    assert list(ours) == [k for k in expected if k != "bias"] and "weight.quant_state.bitsandbytes__fp4" in ours
    for key, value in ours.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    for state_dict in (ours, expected):
        back = NF4Weight.from_state_dict(state_dict)
        assert back.quant_type == "fp4" and torch.equal(float_bits(back.dequantize()), float_bits(fp4.dequantize()))
    assert "fp4" in repr(fp4) and fp4.to("cpu").quant_type == "fp4"


@pytest.mark.parametrize("nested_blocksize", [None, 4, 100])
def test_quantize_with_nested_block_sizes_matches_bnb(nested_blocksize):
    """NF4Weight.quantize(nested_blocksize=...): bitsandbytes' quantize_4bit, whose double quantization
    is quantize_blockwise of absmax - mean(absmax) in blocks of 256, with the nested block size asked
    for instead."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(4))
    q = NF4Weight.quantize(w, 32, nested_blocksize=nested_blocksize)
    packed, state = bnb_f.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=False)
    offset = state.absmax.mean()
    codes, state2 = bnb_f.quantize_blockwise(state.absmax - offset, blocksize=nested_blocksize or 256)
    assert q.blocksize == 32 and q.nested_blocksize == (nested_blocksize or 256)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, codes)
    assert torch.equal(q.absmax_scale, state2.absmax) and torch.equal(q.absmax_offset, offset)
    with pytest.raises(ValueError, match="nested_blocksize must be positive"):
        NF4Weight.quantize(w, 32, nested_blocksize=0)
    with pytest.raises(TypeError, match="nested_blocksize must be None or an int"):
        NF4Weight.quantize(w, 32, nested_blocksize=4.0)
