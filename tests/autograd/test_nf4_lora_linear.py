"""The public ``lora_kernels.nf4_lora_linear`` (QLoRA layer on a bitsandbytes NF4 weight): forward
and every gradient against the float64 reference built on the dequantized weight (hypothesis over
shapes, dtypes, layouts, biases, dropout, double quantization, block sizes) on both CPU backends,
block and nested block sizes on every route, the PyTorch path's row chunks, LoRA-FA saving rules,
PEFT ``lora.bnb.Linear4bit`` equality, torch.compile and argument errors (the ops themselves:
tests/ops/test_nf4_lora_linear_ops.py)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lora_kernels
from lora_kernels import NF4Weight
from tests.autograd.test_lora_linear import DTYPE_PAIRS, PARAMETER_LAYOUTS, _in_layout, _run_and_check, run_drawn_spec
from lora_kernels.kernels import configs
from lora_kernels.ops import triton_launch
from tests.helpers import (BOUNDS, BWD_NEED_FLAGS, DTYPE_IDS, LAYOUTS, GridRecorder, assert_close, bnb_dequantized,
                           check_against_reference, keep_mask_for, make_grad_y, make_problem, reference, run_public,
                           use_backend)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DQ = dict(double_quant=True)


pytestmark = pytest.mark.usefixtures("poisoned")


@st.composite
def nf4_problem_specs(draw):
    lead = draw(st.one_of(st.tuples(st.one_of(st.just(0), st.just(1), st.integers(2, 40))),
                          st.tuples(st.integers(0, 3), st.integers(1, 9))))
    x_dtype, adapter_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    return dict(
        lead=lead,
        # K not a multiple of 64 (blocks span rows) and odd K (rows split bytes) are the point; multiples
        # of 64 take the GEMMs' fast decode (kernels.nf4.nf4_tile_halves)
        K=draw(st.one_of(st.just(1), st.integers(1, 150), st.sampled_from([64, 128]))),
        N=draw(st.one_of(st.just(1), st.integers(1, 70))),
        r=draw(st.one_of(st.integers(1, 16), st.integers(17, 128))),
        x_dtype=x_dtype, adapter_dtype=adapter_dtype,
        bias=draw(st.booleans()), lora_B_bias=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2])),
        # bnb's default block size 64 most often; the others it quantizes with too
        nf4=dict(double_quant=draw(st.booleans()), quant_type=draw(st.sampled_from(["nf4", "nf4", "fp4"])),
                 weight_dtype=draw(st.sampled_from([None, F32, BF16, F16])),
                 blocksize=draw(st.sampled_from([64, 64, 32, 128, 256]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=nf4_problem_specs())
def test_matches_float64_reference(backend, spec):
    run_drawn_spec(backend, spec)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_llama_like_block_layout(backend, double_quant, dtypes):
    # K a multiple of 64 (one block per row segment), several absmax blocks of 256 for double quant
    pb = make_problem((3, 11), 192, 96, 16, *dtypes, bias=True, seed=3, nf4=dict(double_quant=double_quant))
    assert pb.qweight.n_blocks == 96 * 3 and pb.qweight.double_quant == double_quant
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.1)


@pytest.mark.parametrize("K", [192, 70])  # the aligned tile decode, and blocks spanning rows
def test_fp4_weight(backend, K):
    """bitsandbytes' FP4 (transformers' default 4-bit type): the same kernels, with FP4's table."""
    pb = make_problem((3, 11), K, 96, 16, F16, F32, bias=True, lora_B_bias=True, seed=5,
                      nf4=dict(double_quant=True, quant_type="fp4"))
    assert pb.qweight.quant_type == "fp4"
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.1)


@pytest.mark.parametrize("weight_dtype", [F32, F16, BF16])
def test_stored_dtype_differs_from_x(backend, weight_dtype):
    # bnb rounds the decoded weight to its stored dtype, then casts to x's dtype: so do we
    pb = make_problem((13,), 70, 33, 8, F32, seed=4, nf4=dict(double_quant=True, weight_dtype=weight_dtype))
    assert pb.qweight.dtype == weight_dtype
    _run_and_check(backend, pb, make_grad_y(pb))


@pytest.mark.parametrize("dtypes", [(BF16, BF16), (F16, F32), (F32, F32)], ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_large_m_slab_cublas_path(backend, monkeypatch, dtypes):
    # M >= LORA_KERNELS_NF4_CUBLAS_MIN_M: the base products on cuBLAS over slabs of the decoded weight
    # (several slabs here, the last one partial), the LoRA terms, dropout and biases in the kernels
    if backend.name == "torch":
        pytest.skip("a path of the Triton backend")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "30")
    monkeypatch.setattr(configs, "NF4_SLAB_BYTES", 64 * 128 * dtypes[0].itemsize)  # 64 rows of W, 64 columns
    slabs = GridRecorder(triton_launch.nf4_dequantize_tiles_kernel)
    monkeypatch.setattr(triton_launch, "nf4_dequantize_tiles_kernel", slabs)
    pb = make_problem((3, 11), 128, 200, 8, *dtypes, bias=True, lora_B_bias=True, seed=21, nf4=DQ)
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    # forward: rows 0-64, 64-128, 128-192, 192-200 in [32, 64] tiles; dX: columns 0-64, 64-128
    assert slabs.grids == [(2, 2)] * 3 + [(1, 2)] + [(7, 1)] * 2
    slabs.grids.clear()
    # fewer rows, or a weight whose blocks span rows (K % 64 != 0): the fused GEMMs
    for lead, K in (((29,), 128), ((40,), 96)):
        pb = make_problem(lead, K, 200, 8, *dtypes, seed=22, nf4=DQ)
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert slabs.grids == []


@pytest.mark.parametrize("weight_dtype", [BF16, F16])
@pytest.mark.parametrize("layout", ["transposed", "row_strided"])
def test_large_m_slab_path_layouts_and_stored_dtype(backend, monkeypatch, weight_dtype, layout):
    # x not contiguous (cuBLAS reads it as it is) and the weight stored in another dtype than x's
    # (the slabs round to the stored dtype, then to x's, as dequantize_4bit(...).to(x.dtype))
    if backend.name == "torch":
        pytest.skip("a path of the Triton backend")
    monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, "1")
    pb = make_problem((5, 7), 128, 96, 8, F32, bias=True, layout=layout, seed=23,
                      nf4=dict(double_quant=True, weight_dtype=weight_dtype))
    assert pb.qweight.dtype == weight_dtype
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.1)


def test_slab_extent_fits_the_budget(monkeypatch):
    monkeypatch.setattr(configs, "NF4_SLAB_BYTES", 16 << 20)
    assert triton_launch._slab_extent(4096, 4096, 2, 64) == 2048  # 16 MiB: half the 4096 x 4096 bf16 weight
    assert triton_launch._slab_extent(8192, 28672, 2, 64) == 1024
    assert triton_launch._slab_extent(28672, 8192, 2, 64) == 256  # 292 columns fit: whole steps of 64
    assert triton_launch._slab_extent(10**9, 4096, 2, 64) == 64  # at least one step
    assert triton_launch._slab_extent(1000, 300, 2, 64) == 192  # at most half the weight, in steps
    assert triton_launch._slab_extent(100, 30, 4, 64) == 30  # one step holds the whole extent


@pytest.mark.parametrize("r", [1, 128, 256, 300])
def test_ranks(backend, r):
    pb = make_problem((9,), 65, 20, r, F32, seed=5, nf4=DQ)
    _run_and_check(backend, pb, make_grad_y(pb))


# ---------------------------------------------------------------------------------------------
# Block sizes other than bnb's default 64 (quantize_4bit takes 32..4096), nested block sizes
# other than 256, and the PyTorch path's row chunks
# ---------------------------------------------------------------------------------------------
# (blocksize, K, x and adapters' dtypes, double quant). Under the interpreter the NF4 GEMMs take
# 32-wide K tiles for fp32 x and 64-wide ones for 16-bit x (the sm_90 configurations): a weight
# with K % blocksize == 0 and blocksize % tile == 0 takes the tile decode (one scale per tile row),
# any other the per-element decode.
BLOCKSIZE_CASES = [
    (32, 96, (F32, F32), True),  # tile decode of 32-blocks (also the large-M slabs)
    (32, 96, (BF16, BF16), True),  # 64-wide tiles over 32-blocks: the per-element decode
    (128, 256, (F16, F32), True),  # tile decode of 128-blocks (also the large-M slabs)
    (256, 200, (F32, F32), False),  # blocks spanning rows: the per-element decode
    (512, 96, (BF16, F32), True),  # each block spans 5 or 6 rows
    (4096, 150, (F32, F32), True),  # one whole block and a partial one
]


@pytest.mark.parametrize("blocksize, K, dtypes, double_quant", BLOCKSIZE_CASES,
                         ids=[f"bs{b}-K{k}-{DTYPE_IDS[d[0]]}{DTYPE_IDS[d[1]]}" for b, k, d, _ in BLOCKSIZE_CASES])
def test_block_sizes(backend, monkeypatch, blocksize, K, dtypes, double_quant):
    """Forward and every gradient with each route of the Triton backend: the small-M split-K forward
    (5 rows), the GEMMs (21 rows) and, for weights aligned to its tiles, the large-M route whose
    base products run over slabs of the decoded weight."""
    slabs = GridRecorder(triton_launch.nf4_dequantize_tiles_kernel)
    monkeypatch.setattr(triton_launch, "nf4_dequantize_tiles_kernel", slabs)
    aligned = K % blocksize == 0  # (the slabs' tiles are min(64, blocksize) wide: inside one block)
    for lead, min_m in (((5,), "0"), ((3, 7), "0"), ((3, 7), "1"))[:3 if aligned else 2]:
        monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, min_m)
        pb = make_problem(lead, K, 40, 8, *dtypes, bias=True, seed=blocksize + K + len(lead),
                          nf4=dict(blocksize=blocksize, double_quant=double_quant))
        assert pb.qweight.blocksize == blocksize and pb.qweight.double_quant == double_quant
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.1)
    assert bool(slabs.grids) == (aligned and backend.name != "torch")


@pytest.mark.parametrize("nested_blocksize, K", [(16, 128), (100, 100)])
def test_nested_block_sizes(backend, monkeypatch, nested_blocksize, K):
    """Double quantization with second-level blocks of 16 and of 100 (not a power of two) absmax
    values, several of them: a weight's nested block size is its own (a bnb QuantState or a state dict
    holds it), not always quantize_4bit's 256. K = 128: the GEMMs' tile decode, then the large-M
    route's slabs; K = 100: the per-element decode."""
    for min_m in ("0", "1") if K == 128 else ("0",):
        monkeypatch.setenv(triton_launch.NF4_CUBLAS_MIN_M_ENV, min_m)
        pb = make_problem((3, 7), K, 40, 8, F32, bias=True, seed=nested_blocksize,
                          nf4=dict(blocksize=32, nested_blocksize=nested_blocksize))
        q = pb.qweight
        assert q.nested_blocksize == nested_blocksize
        assert q.absmax_scale.numel() == math.ceil(q.n_blocks / nested_blocksize) > 1
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.1)


@pytest.mark.parametrize("chunk_rows, blocksize", [(3, 64), (1, 128)])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32)], ids=lambda d: DTYPE_IDS[d[0]] + DTYPE_IDS[d[1]])
def test_torch_path_row_chunks(monkeypatch, chunk_rows, blocksize, dtypes):
    """The PyTorch path decodes an NF4 weight a chunk of rows at a time (ops.reference.nf4_row_chunks,
    NF4_CHUNK_ELEMENTS values each: a whole 4096 x 4096 weight is 16 chunks). Small chunks here: the
    forward writes each chunk's columns of y, dX adds each chunk's product with its columns of dY;
    chunk starts inside quantization blocks (K = 70), a last partial chunk."""
    from lora_kernels.ops import reference as torch_path
    K, N = 70, 20
    monkeypatch.setattr(torch_path, "NF4_CHUNK_ELEMENTS", chunk_rows * K + K // 2)  # whole rows: rounds down
    decoded = []
    nf4_rows = torch_path.nf4_rows

    def recorded(wq, n0, n1, dtype):
        decoded.append((n0, n1))
        return nf4_rows(wq, n0, n1, dtype)

    monkeypatch.setattr(torch_path, "nf4_rows", recorded)
    with use_backend("torch") as backend:
        pb = make_problem((3, 5), K, N, 8, *dtypes, bias=True, lora_B_bias=True, seed=24 + chunk_rows,
                          nf4=dict(blocksize=blocksize))
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    chunks = [(n0, min(n0 + chunk_rows, N)) for n0 in range(0, N, chunk_rows)]
    assert chunks[-1][1] - chunks[-1][0] == (N % chunk_rows or chunk_rows)
    assert decoded == chunks * 2  # the forward's chunks, then dX's


NF4_PARAMETER_LAYOUTS = [(n, lay) for n, lay in PARAMETER_LAYOUTS if n != "weight"]


@pytest.mark.parametrize("name, layout", NF4_PARAMETER_LAYOUTS, ids=[f"{n}-{lay}" for n, lay in NF4_PARAMETER_LAYOUTS])
def test_parameter_layouts(backend, name, layout):
    # as for lora_linear (the strided / expanded bias was read at unit stride by the Triton forward)
    pb = make_problem((3, 7), 64, 29, 8, bias=True, lora_B_bias=name == "lora_B_bias", seed=13, nf4=DQ)
    setattr(pb, name, _in_layout(getattr(pb, name), layout, torch.Generator().manual_seed(14)))
    _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.3)


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_zero_rows(backend, lead):
    pb = make_problem(lead, 40, 12, 3, BF16, F32, bias=True, seed=6, nf4=DQ)
    y, grads = _run_and_check(backend, pb, make_grad_y(pb))
    assert y.shape == (*lead, 12)


# ---------------------------------------------------------------------------------------------
# Saving rules: the NF4 tensors by reference, h alone under LoRA-FA, x only for dA
# ---------------------------------------------------------------------------------------------
def _saved(pb, dropout_p=0.0):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(7)
        y = lora_kernels.nf4_lora_linear(pb.x, pb.qweight, pb.lora_A, pb.lora_B, pb.scale, bias=pb.bias,
                                         dropout_p=dropout_p)
    q = pb.qweight
    weight_tensors = [t for t in q.op_tensors() if t is not None]
    own = weight_tensors + [pb.lora_A, pb.lora_B]
    others = [t for t in saved if not any(t.data_ptr() == o.data_ptr() and t.shape == o.shape for o in own)]
    return y, others


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_fa_saves_only_h(backend, dropout_p):
    pb = make_problem((4, 6), 100, 30, 7, BF16, F32, bias=True, seed=8, nf4=DQ,
                      requires_grad=("x", "lora_B", "bias"))
    y, others = _saved(pb, dropout_p)
    activations = [t for t in others if t.dtype != torch.int64]
    assert [tuple(t.shape) for t in activations] == [(24, 7)] and activations[0].dtype == F32
    assert len(others) - len(activations) == (1 if dropout_p else 0)  # the 8-byte seed
    grad_y = make_grad_y(pb)
    y.backward(grad_y)
    keep = keep_mask_for(7, 24, 100, dropout_p) if dropout_p else None
    ref_y, ref_grads = reference(pb, grad_y, keep, dropout_p)
    check_against_reference(pb, y, {k: v.grad for k, v in pb.params().items()}, ref_y, ref_grads, BOUNDS[BF16])


def test_trainable_lora_A_saves_x_and_h(backend):
    pb = make_problem((10,), 50, 20, 4, F32, seed=9, nf4=DQ)
    _, others = _saved(pb)
    assert sorted(tuple(t.shape) for t in others) == [(10, 4), (10, 50)]


@pytest.mark.parametrize("trainable", [("x",), ("lora_B",), ("lora_A", "lora_B"), ("bias",)],
                         ids=lambda t: "+".join(t))
def test_need_flags_follow_requires_grad(backend, trainable):
    pb = make_problem((2, 9), 70, 18, 5, F32, bias=True, seed=10, nf4=DQ, requires_grad=trainable)
    _, grads = _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert set(grads) == set(trainable)
    need = backend.calls[-1][2][BWD_NEED_FLAGS]
    assert tuple(need) == ("x" in trainable, "lora_A" in trainable, "lora_B" in trainable, "bias" in trainable)


# ---------------------------------------------------------------------------------------------
# PEFT / bitsandbytes equality
# ---------------------------------------------------------------------------------------------
def _peft_qlora(K, N, r, dtype, seed, device="cpu"):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4",
                                                  compress_statistics=True))
    dense = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(dtype)
    model[0].weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    model[0].bias = torch.nn.Parameter(torch.randn(N, generator=gen).to(dtype))
    model = model.to(device)  # quantizes on the device
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps in lora.bnb.Linear4bit
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=0.0, bias="all")
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    layer = pm.base_model.model[0]
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    assert type(layer) is PeftLinear4bit
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=gen) / math.sqrt(r))
    return layer


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_matches_peft_linear4bit(backend, dtype):
    from lora_kernels.integrations.bitsandbytes import nf4_from_bnb

    # K a multiple of 64: bnb 0.50.2's native CPU dequantize mis-scales rows when K % 16 == 0 but
    # K % blocksize != 0 (blocks spanning rows), and PEFT's QLoRA forward goes through it.
    K, N, r = 128, 40, 8
    layer = _peft_qlora(K, N, r, dtype, seed=12, device=backend.device)
    q = nf4_from_bnb(layer.base_layer)
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(13)).to(backend.device, dtype)
    x_ref = x.clone().requires_grad_(True)
    y_ref = layer(x_ref)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xk = x.clone().requires_grad_(True)
    y = lora_kernels.nf4_lora_linear(xk, q, A, B, layer.scaling["default"], bias=layer.base_layer.bias)
    bound = BOUNDS[dtype]
    assert y.dtype == y_ref.dtype == dtype
    assert_close(y, y_ref, bound, "y vs PEFT")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(14)).to(backend.device, dtype)
    bias = layer.base_layer.bias  # bias="all": trainable, so dbias is computed and checked too
    assert bias.requires_grad
    ref_grads = torch.autograd.grad(y_ref, (x_ref, A, B, bias), grad_y)
    grads = torch.autograd.grad(y, (xk, A, B, bias), grad_y)
    for name, g, g_ref in zip(("dx", "dA", "dB", "dbias"), grads, ref_grads):
        assert_close(g, g_ref, bound, f"{name} vs PEFT")


# ---------------------------------------------------------------------------------------------
# torch.compile, errors
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph(backend):
    pb = make_problem((2, 5), 70, 16, 4, F32, bias=True, seed=15, nf4=DQ)
    grad_y = make_grad_y(pb)
    eager_y, eager_grads = run_public(pb, grad_y)
    eager_grads = {k: g.clone() for k, g in eager_grads.items()}
    fn = torch.compile(lambda x, A, B, b: lora_kernels.nf4_lora_linear(x, pb.qweight, A, B, pb.scale, bias=b),
                       fullgraph=True, backend="aot_eager")
    pb.zero_grad()
    y = fn(pb.x, pb.lora_A, pb.lora_B, pb.bias)
    y.backward(grad_y)
    assert torch.equal(y, eager_y)
    for k, g in eager_grads.items():
        assert torch.equal(pb.params()[k].grad, g), k
    ref_y, ref_grads = reference(pb, grad_y)  # and both against float64
    check_against_reference(pb, y, {k: pb.params()[k].grad for k in eager_grads}, ref_y, ref_grads, BOUNDS[F32])


def _bad_cases():
    pb = make_problem((4,), 70, 6, 2, F32, bias=True, seed=17, nf4=DQ)
    x, q, A, B, b = pb.x.detach(), pb.qweight, pb.lora_A.detach(), pb.lora_B.detach(), pb.bias.detach()
    q1d = NF4Weight.quantize(torch.randn(70))
    V, T = ValueError, TypeError
    return {
        "dense weight": (dict(qweight=pb.weight), T, "qweight"),
        "1-D qweight": (dict(qweight=q1d), V, "qweight"),
        "K mismatch": (dict(x=x[:, :69]), V, "x"),
        "lora_A K": (dict(lora_A=A[:, :69]), V, "lora_A"),
        "lora_B N": (dict(lora_B=B[:5]), V, "lora_B"),
        "bias N": (dict(bias=b[:5]), V, "bias"),
        "int x": (dict(x=x.long()), T, "x"),
        "fp16 adapters with fp32 x": (dict(lora_A=A.half(), lora_B=B.half()), V, "lora_A"),
        "x on meta": (dict(x=x.to("meta")), V, "qweight"),
        "dropout 1": (dict(dropout_p=1.0), V, "dropout_p"),
        "r = 0": (dict(lora_A=A[:0], lora_B=B[:, :0]), V, "lora_A"),
    }, dict(x=x, qweight=q, lora_A=A, lora_B=B, scale=pb.scale, bias=b)


_CASES, _GOOD = _bad_cases()


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_arguments_raise_naming_the_argument(case):
    overrides, exc, name = _CASES[case]
    kwargs = {**_GOOD, **overrides}
    with pytest.raises(exc, match=rf"^{name} "):
        lora_kernels.nf4_lora_linear(kwargs.pop("x"), kwargs.pop("qweight"), kwargs.pop("lora_A"),
                                     kwargs.pop("lora_B"), kwargs.pop("scale"), **kwargs)


# ---- the NF4 base layer alone (merged QLoRA layers) --------------------------------------------
@pytest.mark.parametrize("lead", [(0,), (1,), (3, 5)], ids=["M0", "M1", "3d"])
@pytest.mark.parametrize("dtype, weight_dtype", [(F32, BF16), (F16, F16), (BF16, F32)],
                         ids=["f32-wbf16", "f16", "bf16-wf32"])
def test_nf4_base_linear_saves_no_decoded_weight(lead, dtype, weight_dtype):
    """y, dx and dbias against float64 on bnb's decode, and nothing N x K saved for backward (plain
    F.linear of the decoded weight keeps that copy for dx; bitsandbytes' Linear4bit does not)."""
    from lora_kernels.autograd.nf4_lora_linear import nf4_base_linear
    N, K = 48, 40  # N x K = 1920 elements, above every other tensor here
    gen = torch.Generator().manual_seed(11)
    q = NF4Weight.quantize(torch.randn(N, K, generator=gen).to(weight_dtype), **DQ)
    x = torch.randn(*lead, K, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(N, generator=gen).to(dtype).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4_base_linear(x, q, bias)
    assert all(t.numel() < N * K for t in saved), [tuple(t.shape) for t in saved]
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(gy)
    W64 = bnb_dequantized(q).to(dtype).double()
    bound = BOUNDS[dtype]
    assert y.dtype == dtype
    assert_close(y, x.detach().double() @ W64.T + bias.detach().double(), bound, "y")
    assert_close(x.grad, gy.double() @ W64, bound, "dx")
    assert_close(bias.grad, gy.double().reshape(-1, N).sum(0), bound, "dbias")


def test_nf4_base_linear_second_derivative():
    """Its backward is plain differentiable ops: a gradient penalty differentiates through it exactly
    (float64 reference: d/dx of ||dy/dx . g||^2 with y linear in x is 0, d/dg is 2 W (W^T g))."""
    from lora_kernels.autograd.nf4_lora_linear import nf4_base_linear
    gen = torch.Generator().manual_seed(12)
    q = NF4Weight.quantize(torch.randn(24, 20, generator=gen), **DQ)
    x = torch.randn(5, 20, generator=gen, requires_grad=True)
    g = torch.randn(5, 24, generator=gen, requires_grad=True)
    (dx,) = torch.autograd.grad(nf4_base_linear(x, q), x, g, create_graph=True)
    dx.pow(2).sum().backward()
    W64 = bnb_dequantized(q).double()
    assert_close(g.grad, 2 * (g.detach().double() @ W64) @ W64.T, BOUNDS[F32], "d/dg")


@pytest.mark.parametrize("weight_dtype, x_dtype, autocast_dtype", [(F32, BF16, F16), (F32, F16, BF16), (F16, BF16, F16),
                                                                   (BF16, F32, BF16)])
def test_nf4_base_linear_under_autocast_follows_bitsandbytes_cast_chain(weight_dtype, x_dtype, autocast_dtype):
    """Under torch.autocast, bitsandbytes' Linear4bit decodes to the stored dtype, casts to x's dtype,
    and F.linear then casts both to the autocast dtype: y, dx and dbias equal that chain bit for bit
    (decoding straight to the autocast dtype rounds differently when x's 16-bit dtype is the other one)."""
    from lora_kernels.autograd.nf4_lora_linear import nf4_base_linear
    gen = torch.Generator().manual_seed(13)
    q = NF4Weight.quantize(torch.randn(40, 72, generator=gen).to(weight_dtype), **DQ)
    x0 = torch.randn(6, 72, generator=gen).to(x_dtype)
    b0 = torch.randn(40, generator=gen).to(x_dtype)
    gy = torch.randn(6, 40, generator=gen).to(autocast_dtype)
    results = []
    for run in (nf4_base_linear, lambda x, q, b: torch.nn.functional.linear(x, bnb_dequantized(q).to(x.dtype), b)):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=autocast_dtype):
            y = run(x, q, b)
        y.backward(gy)
        results.append((y, x.grad, b.grad))
    for name, got, want in zip(("y", "dx", "dbias"), *results):
        assert got.dtype == want.dtype and torch.equal(got, want), name
