"""The GEMMs' fast NF4 decode (``kernels.nf4.nf4_tile_halves``: one scale per tile row) and the slab decode
of the large-M path (``nf4_dequantize_tiles_kernel``, through ``ops.triton_launch.triton_nf4_dequantize_slab``) against the weight bitsandbytes' format decodes to (``NF4Weight.dequantize``, itself
bit-exact with ``dequantize_4bit``): bit for bit, per stored dtype, with and without double
quantization, for tiles at every position of aligned weights, rows past N zero. Runs the kernel
under the interpreter on CPU and compiled on a GPU (the "cuda" cases)."""
import pytest
import torch
import triton
import triton.language as tl

from lora_kernels import NF4Weight
from lora_kernels.kernels.nf4 import nf4_tile_halves
from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.triton_launch import (TL_DTYPES, is_interpreted, nf4_aligned, nf4_slab_block_k,
                                            triton_nf4_dequantize_slab)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@triton.jit
def _tiles_kernel(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
                  out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                  QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, STORED_DTYPE: tl.constexpr):
    """Program (i, j) writes tile W[i*BLOCK_N:, j*BLOCK_K:] into out [cdiv(N, BLOCK_N)*BLOCK_N, K]."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    even, odd = nf4_tile_halves(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                code_ptr, offs_n.to(tl.int64), offs_n < N, k0, K, BLOCK_K, QBLOCK, QBLOCK2,
                                DOUBLE_QUANT, STORED_DTYPE)
    cols = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    tl.store(out_ptr + offs_n[:, None] * K + cols[None, :], even)
    tl.store(out_ptr + offs_n[:, None] * K + (cols + 1)[None, :], odd)


def _decode_by_tiles(qw: NF4Weight, block_n: int, block_k: int, device) -> torch.Tensor:
    N, K = qw.shape
    tensors = [t.to(device) if t is not None else None for t in qw.op_tensors()]
    wq = NF4Tensors(*tensors, N, K, qw.blocksize, qw.nested_blocksize, qw.dtype)
    assert nf4_aligned(wq, block_k)
    out = torch.full((triton.cdiv(N, block_n) * block_n, K), float("nan"), dtype=qw.dtype, device=device)
    kwargs = {} if device == "cpu" else {"enable_fp_fusion": False}  # as the GEMM launches
    _tiles_kernel[(triton.cdiv(N, block_n), K // block_k)](
        *tensors, out, N, K, BLOCK_N=block_n, BLOCK_K=block_k, QBLOCK=qw.blocksize,
        QBLOCK2=qw.nested_blocksize, DOUBLE_QUANT=wq.double_quant, STORED_DTYPE=TL_DTYPES[qw.dtype], **kwargs)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize,block_k", [(64, 64), (64, 32), (128, 64)])
def test_tiles_equal_the_dequantized_weight_bit_for_bit(device, dtype, double_quant, blocksize, block_k):
    if device == "cpu" and not is_interpreted():
        pytest.skip("the CPU case runs the kernel under TRITON_INTERPRET=1")
    N, K = 37, 4 * blocksize  # N not a multiple of the tile rows: the last tile has masked rows
    gen = torch.Generator().manual_seed(blocksize + block_k + int(double_quant))
    # Rows of very different scales, so that absmax decoding errors could not hide
    weight = (torch.randn(N, K, generator=gen) * torch.logspace(-3, 1, N)[:, None]).to(dtype)
    qw = NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    got = _decode_by_tiles(qw, 16, block_k, device).cpu()
    expected = qw.dequantize()
    assert torch.equal(got[:N].view(torch.uint8), expected.view(torch.uint8)), \
        f"max abs diff {(got[:N].float() - expected.float()).abs().max()}"
    assert torch.equal(got[N:], torch.zeros_like(got[N:]))  # rows past N decode to 0 (not code[0] * offset)


@pytest.mark.parametrize("device", DEVICES)
def test_double_quant_scales_across_second_level_blocks(device):
    # 300 rows x 128 = 600 absmax blocks: three second-level (256-block) scales are in use
    if device == "cpu" and not is_interpreted():
        pytest.skip("the CPU case runs the kernel under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(300, 128, generator=gen) * torch.linspace(0.01, 5, 300)[:, None]).to(torch.bfloat16)
    qw = NF4Weight.quantize(weight, blocksize=64, double_quant=True)
    assert qw.n_blocks == 600
    got = _decode_by_tiles(qw, 32, 64, device).cpu()[:300]
    assert torch.equal(got.view(torch.uint8), qw.dequantize().view(torch.uint8))


def test_aligned_rule():
    def wq(K, blocksize=64):
        return NF4Tensors(*(None,) * 6, 8, K, blocksize, 256, torch.bfloat16)
    assert nf4_aligned(wq(128), 64) and nf4_aligned(wq(128), 32) and nf4_aligned(wq(256, 128), 64)
    assert not nf4_aligned(wq(96), 64)        # a block spans two rows
    assert not nf4_aligned(wq(128), 128)      # a tile spans two blocks
    assert not nf4_aligned(wq(64, 32), 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_slab_decode_equals_the_dequantized_weight_bit_for_bit(device, dtype, double_quant, blocksize):
    if device == "cpu" and not is_interpreted():
        pytest.skip("the CPU case runs the kernel under TRITON_INTERPRET=1")
    N, K = 45, 6 * blocksize
    gen = torch.Generator().manual_seed(blocksize + int(double_quant))
    weight = (torch.randn(N, K, generator=gen) * torch.logspace(-2, 1, N)[:, None]).to(dtype)
    qw = NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    tensors = [t.to(device) if t is not None else None for t in qw.op_tensors()]
    wq = NF4Tensors(*tensors, N, K, qw.blocksize, qw.nested_blocksize, qw.dtype)
    step = nf4_slab_block_k(wq)
    assert nf4_aligned(wq, step)
    expected = qw.dequantize()
    # slabs of rows (all columns), of columns (all rows), and an inner one, ending mid tile
    for n0, n1, k0, k1 in ((0, N, 0, K), (7, 40, 0, K), (0, N, step, K), (33, 45, 2 * step, 4 * step)):
        got = triton_nf4_dequantize_slab(wq, n0, n1, k0, k1, dtype).cpu()
        assert got.is_contiguous() and got.shape == (n1 - n0, k1 - k0)
        assert torch.equal(got.view(torch.uint8), expected[n0:n1, k0:k1].contiguous().view(torch.uint8)), (n0, n1, k0, k1)
    # in another dtype: the stored dtype's rounding first, then torch's (round to nearest even), as
    # dequantize_4bit(...).to(out_dtype) (the interpreter's own fp32 -> bf16 cast truncates)
    for out_dtype in {torch.bfloat16, torch.float16, torch.float32} - {dtype}:
        got = triton_nf4_dequantize_slab(wq, 0, N, 0, K, out_dtype).cpu()
        assert torch.equal(got.view(torch.uint8), expected.to(out_dtype).view(torch.uint8)), out_dtype
