"""The CUDA kernels of csrc/ on a CPU, run by the emulation (lora_kernels/tools/csrc_emulation.py,
itself checked by tests/tools/test_csrc_emulation.py): the kernels' own source, every CUDA thread a
fiber, against the same float64 references (and bit-exact bitsandbytes decodes) as the op's GPU tests
in tests/ops/test_nf4_gemv.py."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kernels import NF4Weight
from lora_kernels.ops import nf4_gemv
from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.triton_launch import is_interpreted
from lora_kernels.tools import csrc_emulation as emulation
from tests.helpers import (assert_close, bnb_dequantized, nf4_gemv_inputs, nf4_gemv_reference, nf4_grad_input_args,
                           nf4_grad_input_reference, nf4_slab_args, nf4_weights_of_each_stored_dtype)

pytestmark = pytest.mark.skipif(emulation.available() is not None,
                                reason=f"csrc emulation unavailable: {emulation.available()}")

KERNELS = {"simt": 0, "mma": 1}
# Relative error of y and h against float64: the output's rounding to x's dtype dominates (the
# tensor-core kernel adds its per-weight rounding of the NF4 code to x's dtype); the GPU tests' bounds.
BOUND = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
# (bias, double quantization, adapters' dtype, stored dtype) for x's dtype; the last two: a stored
# dtype other than x's (the decode rounds to it, then to x's dtype).
VARIANTS = ((False, True, None, None), (True, True, torch.float32, None), (True, False, None, None),
            (False, True, None, torch.float32), (True, True, None, "other"))


def _variant(dtype, variant):
    bias, dq, adapter_dtype, weight_dtype = variant
    if weight_dtype == "other":
        weight_dtype = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    return bias, dq, adapter_dtype or dtype, weight_dtype or dtype


def _check(kernel, args, q, label, **options):
    x, A = args[0], args[7]
    y, h = emulation.nf4_gemv_lora(*args, KERNELS[kernel], **options)
    y_ref, h_ref = nf4_gemv_reference(args, q)
    assert y.dtype == x.dtype and h.dtype == A.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, BOUND[x.dtype], f"y {kernel} {label}")
    if A.shape[0]:
        assert_close(h, h_ref, BOUND[x.dtype], f"h {kernel} {label}")


@pytest.mark.parametrize("kernel", ["simt", "mma"])
def test_results_do_not_depend_on_the_thread_schedule(kernel):
    """The same bits whichever order the emulation resumes threads in: no result depends on an
    interleaving that a barrier does not fix (a missing barrier would make some order read shared
    memory before it is written, or after it is overwritten)."""
    args, q = nf4_gemv_inputs(9, 1024, 70, 8, torch.bfloat16, torch.bfloat16, True, seed=9)
    y, h = emulation.nf4_gemv_lora(*args, KERNELS[kernel])
    for order in (1, 2, 3):
        with emulation.schedule(order):
            y_o, h_o = emulation.nf4_gemv_lora(*args, KERNELS[kernel], defer_lora=kernel == "mma" and order == 2)
        assert torch.equal(y_o, y) and torch.equal(h_o, h), order
    slab = nf4_slab_args(q, 3, 60, 64, 1024, torch.bfloat16)
    with emulation.schedule(2):
        assert torch.equal(emulation.nf4_dequantize_slab(*slab), bnb_dequantized(q).to(torch.bfloat16)[3:60, 64:1024])


def test_simt_kernel_with_k_zero_reads_no_stale_shared_memory():
    """K = 0 (a direct call of the op): no chunk loop, so no barrier inside it; the epilogue still
    reads h from shared memory written by other threads. A call with K > 0 first leaves other values
    in the emulated kernel's static shared memory: y must be the bias alone, whatever the schedule."""
    g = torch.Generator().manual_seed(3)
    N, r = 40, 8
    bias = torch.randn(N, generator=g)

    def call(K, order):
        q = NF4Weight.quantize(torch.randn(N, K, generator=g).to(torch.bfloat16), double_quant=False)
        x, A = (torch.randn(rows, K, generator=g).to(torch.bfloat16) for rows in (1, r))
        B = torch.randn(N, r, generator=g).to(torch.bfloat16)
        with emulation.schedule(order):
            return emulation.nf4_gemv_lora(x, *q.op_tensors(), A, B, bias, 1.0, q.blocksize, q.nested_blocksize,
                                           q.dtype, KERNELS["simt"])

    for order in (0, 1, 2):
        call(64, 0)
        y, h = call(0, order)
        assert torch.equal(h, torch.zeros_like(h)) and torch.equal(y, bias.to(torch.bfloat16)[None]), order


# ----------------------------------------------------------------------------- SIMT GEMV

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# every row tile (1, 2, 4, 8, 16 rows; the shrink kernel runs r * M blocks: the emulation's cost)
@pytest.mark.parametrize("M,r", [(1, 64), (2, 1), (3, 8), (5, 1), (16, 4)])
@pytest.mark.parametrize("K,packed_offset", [(512, 0), (512, 4), (263, 0)])  # vector path, element paths
def test_simt_kernel_matches_reference(dtype, M, r, K, packed_offset):
    for variant in VARIANTS:
        bias, dq, adapter_dtype, weight_dtype = _variant(dtype, variant)
        args, q = nf4_gemv_inputs(M, K, 37, r, dtype, adapter_dtype, bias, dq, seed=M * K + r,
                                  weight_dtype=weight_dtype)
        _check("simt", args, q, f"{variant}", packed_offset=packed_offset)


@pytest.mark.parametrize("kernel", ["simt", "mma"])
def test_largest_call_sixteen_rows_rank_64(kernel):
    args, q = nf4_gemv_inputs(16, 1024, 40, 64, torch.bfloat16, torch.float32, True, seed=64)
    _check(kernel, args, q, "M=16 r=64")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1024 + 64, 200 + 3])  # two chunks of x (vector path); odd K (element path)
def test_simt_kernel_decodes_bit_exactly(dtype, K, quant_type):
    """Rows of x that are one-hot at column k make y[m, :] = W[:, k] exactly (every other product is an
    exact zero): the kernel's decode, not only its sums, against bitsandbytes' dequantize_4bit, at
    columns around block and chunk boundaries; NF4 and FP4 (the table is the op's argument)."""
    args, q = nf4_gemv_inputs(16, K, 45, 0, dtype, dtype, False, seed=K, quant_type=quant_type)
    columns = [0, 1, 31, 32, 63, 64, 65, 127, K // 2, K - 65, K - 64, K - 33, K - 2, K - 1, 1023 % K, 1024 % K]
    x = torch.zeros(16, K, dtype=dtype)
    x[torch.arange(16), torch.tensor(columns)] = 1.0
    y, _ = emulation.nf4_gemv_lora(x, *args[1:], 0)
    W = bnb_dequantized(q).to(dtype)
    assert torch.equal(y, W[:, columns].t())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 16), N=st.integers(1, 70), K=st.integers(1, 700), r=st.integers(0, 16),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), variant=st.sampled_from(VARIANTS),
       stride_pad=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_simt_kernel_on_drawn_shapes(M, N, K, r, dtype, variant, stride_pad, seed):
    bias, dq, adapter_dtype, weight_dtype = _variant(dtype, variant)
    args, q = nf4_gemv_inputs(M, K, N, r, dtype, adapter_dtype, bias, dq, seed=seed, weight_dtype=weight_dtype)
    wide = torch.randn(M, K + stride_pad).to(dtype)  # rows of x stride_pad elements apart beyond K
    wide[:, :K] = args[0]
    _check("simt", (wide[:, :K], *args[1:]), q, f"M={M} N={N} K={K} r={r} {variant} pad={stride_pad}")


# ----------------------------------------------------------------------------- tensor-core GEMV

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 9, 16])  # one and two column tiles of x, rows past M
@pytest.mark.parametrize("N,K", [(5, 256), (70, 1024), (40, 4864)])
def test_mma_kernel_matches_reference(dtype, M, N, K):
    """The decomposition of csrc/nf4_gemv_mma_kernel.cuh: fewer rows than a tile (N = 5), more tiles
    than the 3 emulated SMs (persistent blocks, the cp.async ring running across tiles), warps with no
    pass (K = 256, 1024), passes not dividing evenly among the 16 warps (K = 4864: 19 passes)."""
    for variant in VARIANTS:
        bias, dq, adapter_dtype, weight_dtype = _variant(dtype, variant)
        args, q = nf4_gemv_inputs(M, K, N, 16, dtype, adapter_dtype, bias, dq, seed=N + K + M,
                                  weight_dtype=weight_dtype)
        _check("mma", args, q, f"{variant}")
    args, q = nf4_gemv_inputs(M, K, N, 16, dtype, dtype, True, seed=N + K, quant_type="fp4")
    _check("mma", args, q, "fp4")  # the table of code pairs is built from the op's table


@pytest.mark.parametrize("shared_optin,stages", [(emulation.H100_SHARED_OPTIN, 3), (emulation.A100_SHARED_OPTIN, 2)])
@pytest.mark.parametrize("r", [0, 64])
def test_mma_kernel_ring_depths_and_ranks(shared_optin, stages, r):
    assert (nf4_gemv.MMA_SHARED_BYTES <= shared_optin) and stages in (2, 3)
    for sms in (1, 4):
        args, q = nf4_gemv_inputs(9, 2048, 50, r, torch.bfloat16, torch.bfloat16, True, seed=r + sms)
        _check("mma", args, q, f"optin={shared_optin} r={r} sms={sms}", sms=sms, shared_optin=shared_optin)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 16), N=st.integers(1, 60), passes=st.integers(1, 20), r=st.integers(0, 16),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), variant=st.sampled_from(VARIANTS),
       sms=st.integers(1, 5), defer=st.booleans(), seed=st.integers(0, 2**16))
def test_mma_kernel_on_drawn_shapes(M, N, passes, r, dtype, variant, sms, defer, seed):
    bias, dq, adapter_dtype, weight_dtype = _variant(dtype, variant)
    args, q = nf4_gemv_inputs(M, 256 * passes, N, r, dtype, adapter_dtype, bias, dq, seed=seed,
                              weight_dtype=weight_dtype)
    _check("mma", args, q, f"M={M} N={N} K={256 * passes} r={r} {variant} sms={sms} defer={defer}", sms=sms,
           defer_lora=defer)


@pytest.mark.parametrize("M", [1, 9, 16])
def test_mma_kernel_deferred_lora_term_gives_the_same_bits(M):
    """After the shrink kernel on sm_90 the launcher has the tensor-core kernel defer its LoRA term to
    a tail pass (base sums parked in an fp32 buffer until h is there): the same bits as the epilogue
    that adds it per tile, with every tile count per block, rank and bias."""
    for N, K, sms, r, bias, adapter_dtype in ((70, 1024, 3, 16, True, torch.bfloat16),
                                              (5, 256, 1, 8, False, torch.float32),
                                              (300, 512, 4, 64, True, torch.bfloat16)):
        args, q = nf4_gemv_inputs(M, K, N, r, torch.bfloat16, adapter_dtype, bias, seed=N + M)
        y, h = emulation.nf4_gemv_lora(*args, KERNELS["mma"], sms=sms)
        y_deferred, h_deferred = emulation.nf4_gemv_lora(*args, KERNELS["mma"], sms=sms, defer_lora=True)
        assert torch.equal(y_deferred, y) and torch.equal(h_deferred, h), (N, K, r)
        assert_close(y_deferred, nf4_gemv_reference(args, q)[0], BOUND[torch.bfloat16], f"y N={N} r={r}")


# ----------------------------------------------------------------------------- slab decode

@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant,quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_slab_decode_is_bit_exact(out_dtype, double_quant, quant_type):
    for weight_dtype, q in nf4_weights_of_each_stored_dtype(37, 2112, double_quant, quant_type=quant_type):
        W = bnb_dequantized(q).to(out_dtype)
        # whole weight (more columns than a block of threads), row and column windows, one row
        for n0, n1, k0, k1 in ((0, 37, 0, 2112), (3, 29, 64, 1096), (0, 37, 2048 - 8, 2112), (36, 37, 8, 16)):
            out = emulation.nf4_dequantize_slab(*nf4_slab_args(q, n0, n1, k0, k1, out_dtype))
            assert out.dtype == out_dtype and out.shape == (n1 - n0, k1 - k0)
            assert torch.equal(out, W[n0:n1, k0:k1]), (weight_dtype, n0, n1, k0, k1)


def test_slab_decode_of_a_weight_whose_blocks_span_rows():
    """K = 40: quantization blocks of 64 straddle rows, the block index comes from the flat index."""
    q = NF4Weight.quantize(torch.randn(33, 40, generator=torch.Generator().manual_seed(2)) / math.sqrt(40))
    out = emulation.nf4_dequantize_slab(*nf4_slab_args(q, 1, 32, 8, 40, torch.bfloat16))
    assert torch.equal(out, bnb_dequantized(q).to(torch.bfloat16)[1:32, 8:40])


# ----------------------------------------------------------------------------- small-M backward dX

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 8, 13])  # tiles of 1, 4, 8 rows; two launches of 8
@pytest.mark.parametrize("N,K", [(37, 64), (300, 520)])  # one split; several splits, a partial column block
def test_grad_input_kernel_matches_reference(dtype, M, N, K):
    bound = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    for init, dq, weight_dtype in ((True, True, None), (False, False, None), (True, True, other)):
        args, q = nf4_grad_input_args(M, N, K, dtype, init, dq, weight_dtype, seed=M + N)
        dx = emulation.nf4_grad_input(*args)
        assert dx.dtype == dtype and dx.shape == (M, K)
        assert_close(dx, nf4_grad_input_reference(args, q), bound, f"dx init={init} dq={dq} stored={weight_dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_input_kernel_decodes_bit_exactly(dtype):
    """Rows of dY one-hot at row n of W make dx[m, :] = W[n, :] exactly: the decode itself, against
    bitsandbytes', at rows of different splits."""
    N, K = 700, 264
    args, q = nf4_grad_input_args(6, N, K, dtype, False, seed=1)
    rows = [0, 1, 63, 64, 350, N - 1]
    grad_y = torch.zeros(6, N, dtype=dtype)
    grad_y[torch.arange(6), torch.tensor(rows)] = 1.0
    dx = emulation.nf4_grad_input(grad_y, *args[1:], sms=8)
    assert torch.equal(dx, bnb_dequantized(q).to(dtype)[rows])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 20), N=st.integers(1, 400), K8=st.integers(1, 80), init=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), sms=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_grad_input_kernel_on_drawn_shapes(M, N, K8, init, dtype, sms, seed):
    args, q = nf4_grad_input_args(M, N, 8 * K8, dtype, init, seed=seed)
    dx = emulation.nf4_grad_input(*args, sms=sms)
    assert_close(dx, nf4_grad_input_reference(args, q), BOUND[dtype], f"M={M} N={N} K={8 * K8} sms={sms}")


# ----------------------------------------------------------------------------- block sizes

# bitsandbytes quantizes in blocks of 32 to 4096 values (64 by default) and double-quantizes absmax
# in blocks of 256; a weight may carry other nested blocks (a QuantState, a state dict). The SIMT
# GEMV takes power-of-two blocks >= 32, the dX and slab kernels >= 8, both power-of-two nested blocks;
# the tensor-core GEMV blocks of 64 with nested blocks >= 4. (blocksize, nested; None: 256.)
BLOCK_SIZES = [(32, None), (128, 16), (256, 8), (1024, 4)]  # each weight: several nested blocks
BLOCK_SIZE_IDS = [f"bs{b}-nested{n or 256}" for b, n in BLOCK_SIZES]


@pytest.mark.parametrize("blocksize, nested_blocksize", BLOCK_SIZES, ids=BLOCK_SIZE_IDS)
def test_simt_kernel_block_sizes(blocksize, nested_blocksize):
    """y and h against float64 on the vector path (K = 512) and the element path (odd K), with and
    without double quantization; then the decode bit-exact at block boundaries (one-hot rows of x)."""
    for K, dq in ((512, True), (263, nested_blocksize is None)):
        args, q = nf4_gemv_inputs(3, K, 37, 4, torch.float16, torch.float16, True, dq, seed=blocksize + K,
                                  blocksize=blocksize, nested_blocksize=nested_blocksize)
        assert q.blocksize == blocksize and (not dq or q.absmax_scale.numel() > 1)
        _check("simt", args, q, f"K={K} dq={dq}")
    K = 1024 + 64  # two chunks of x
    args, q = nf4_gemv_inputs(16, K, 45, 0, torch.bfloat16, torch.bfloat16, False, seed=blocksize,
                              blocksize=blocksize, nested_blocksize=nested_blocksize)
    columns = [0, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 1055, 1056, K - 1]
    x = torch.zeros(16, K, dtype=torch.bfloat16)
    x[torch.arange(16), torch.tensor(columns)] = 1.0
    y, _ = emulation.nf4_gemv_lora(x, *args[1:], 0)
    assert torch.equal(y, bnb_dequantized(q).to(torch.bfloat16)[:, columns].t())


@pytest.mark.parametrize("blocksize, nested_blocksize", BLOCK_SIZES, ids=BLOCK_SIZE_IDS)
def test_grad_input_kernel_block_sizes(blocksize, nested_blocksize):
    """fp32 dX (the tightest bound) against float64, with several splits of N, with and without double
    quantization."""
    for init, dq in ((True, True), (False, False)):
        args, q = nf4_grad_input_args(5, 300, 264, torch.float32, init, dq, seed=blocksize, blocksize=blocksize,
                                      nested_blocksize=nested_blocksize)
        assert q.blocksize == blocksize and (not dq or q.absmax_scale.numel() > 1)
        dx = emulation.nf4_grad_input(*args, sms=4)
        assert_close(dx, nf4_grad_input_reference(args, q), 1e-5, f"dx init={init} dq={dq}")


@pytest.mark.parametrize("blocksize, nested_blocksize", BLOCK_SIZES, ids=BLOCK_SIZE_IDS)
def test_slab_decode_block_sizes(blocksize, nested_blocksize):
    """A window of rows and columns (starting and ending inside blocks) bit-exact with bitsandbytes."""
    for double_quant in (True, False):
        w = torch.randn(9, 2048, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
        q = NF4Weight.quantize(w, blocksize, double_quant, nested_blocksize=nested_blocksize)
        assert not double_quant or q.absmax_scale.numel() > 1
        out = emulation.nf4_dequantize_slab(*nf4_slab_args(q, 1, 8, 24, 2048 - 8, torch.bfloat16))
        assert torch.equal(out, bnb_dequantized(q).to(torch.bfloat16)[1:8, 24:2048 - 8]), double_quant


@pytest.mark.parametrize("nested_blocksize", [4, 16])
def test_mma_kernel_nested_block_sizes(nested_blocksize):
    """The tensor-core GEMV reads one second-level scale per pass of 4 blocks: nested blocks of 4 (one
    per pass) and 16, against float64."""
    args, q = nf4_gemv_inputs(3, 512, 20, 8, torch.bfloat16, torch.bfloat16, True, seed=nested_blocksize,
                              nested_blocksize=nested_blocksize)
    assert q.nested_blocksize == nested_blocksize and q.absmax_scale.numel() > 1
    assert nf4_gemv.mma_weight_ok(NF4Tensors.of(q))
    _check("mma", args, q, f"nested={nested_blocksize}")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_qlora_backward_takes_the_cuda_dx_route(monkeypatch, dtypes):
    """nf4_lora_linear's backward through the small-M CUDA dX route of the Triton backend
    (ops.triton_launch._cuda_base_grad_input), taken on a CPU as on a GPU with the op served by the
    emulated kernel: forward and every gradient against float64, the dropout mask in the LoRA term."""
    from lora_kernels.ops import triton_launch
    from tests.autograd.test_lora_linear import _run_and_check
    from tests.helpers import make_grad_y, make_problem, use_backend
    monkeypatch.setenv(nf4_gemv.NF4_GRAD_INPUT_ENV, "64")
    monkeypatch.setattr(triton_launch, "_use_cuda_grad_input", nf4_gemv.grad_input_eligible)
    calls = []

    def emulated(grad_y2, wq, init):
        calls.append(tuple(grad_y2.shape))
        return emulation.nf4_grad_input(grad_y2, wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale,
                                        wq.absmax_offset, wq.code, init, wq.K, wq.blocksize, wq.nested_blocksize,
                                        wq.dtype)

    monkeypatch.setattr(nf4_gemv, "cuda_grad_input", emulated)
    with use_backend("triton") as backend:
        pb = make_problem((3, 4), 128, 70, 8, *dtypes, bias=True, seed=5, nf4=dict(double_quant=True))
        _run_and_check(backend, pb, make_grad_y(pb), dropout_p=0.2)
    assert calls == [(12, 70)]


@pytest.mark.skipif(not is_interpreted(), reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("kernel", ["simt", "mma"])
def test_qlora_layer_with_every_cuda_route_emulated(monkeypatch, kernel):
    """nf4_lora_linear forward and backward through the CUDA routes of a GPU, on a CPU: the forward on
    the decode GEMV (24 rows: launches of 16 and 8, the kernel under test), h saved from it, the
    backward's dX on the dX kernel, each op served by the emulated kernel; the other backward kernels
    are the Triton ones under the interpreter. Forward and every gradient against float64."""
    from lora_kernels.ops import CPU_BACKEND_ENV
    from lora_kernels.ops import nf4_lora_linear as nf4_ops
    from lora_kernels.ops import triton_launch
    from tests.helpers import BOUNDS, check_against_reference, make_grad_y, make_problem, reference, run_public
    launches = []

    def gemv_op(x, *rest):
        launches.append((x.shape[0], rest[-1]))
        return emulation.nf4_gemv_lora(x, *rest)

    def grad_input(grad_y2, wq, init):
        launches.append((grad_y2.shape[0], "dx"))
        return emulation.nf4_grad_input(grad_y2, wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale,
                                        wq.absmax_offset, wq.code, init, wq.K, wq.blocksize, wq.nested_blocksize,
                                        wq.dtype)

    monkeypatch.setenv(nf4_gemv.NF4_GEMV_KERNEL_ENV, kernel)
    monkeypatch.setenv(nf4_gemv.NF4_GRAD_INPUT_ENV, "64")
    monkeypatch.setattr(nf4_ops, "use_cuda_gemv", nf4_gemv.gemv_eligible)  # the rule without its device check
    monkeypatch.setattr(nf4_gemv, "mma_device_ok", lambda device: True)
    monkeypatch.setattr(nf4_gemv.torch.ops.lora_kernels, "nf4_gemv_lora", gemv_op)
    monkeypatch.setattr(triton_launch, "_use_cuda_grad_input", nf4_gemv.grad_input_eligible)
    monkeypatch.setattr(nf4_gemv, "cuda_grad_input", grad_input)
    monkeypatch.setenv(CPU_BACKEND_ENV, "triton")  # the Triton backend's routes, as on a GPU
    pb = make_problem((2, 12), 512, 40, 8, torch.bfloat16, torch.bfloat16, bias=True, seed=7,
                      nf4=dict(double_quant=True))
    grad_y = make_grad_y(pb)
    y, grads = run_public(pb, grad_y)
    check_against_reference(pb, y, grads, *reference(pb, grad_y), BOUNDS[torch.bfloat16],
                            reference(pb, grad_y, absolute=True))
    code = KERNELS[kernel]
    assert launches == [(16, code), (8, code), (24, "dx")]
