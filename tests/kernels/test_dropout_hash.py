"""The Triton dropout hash ``kernels.common.dropout_keep`` equals its PyTorch spec
``ops.dropout_mask.dropout_keep_mask`` bit for bit (and an independent pure-Python version of the
hash), and the masks behave like independent Bernoulli(1 - p) draws."""
import math

import pytest
import torch
import triton
import triton.language as tl

from lora_kernels.kernels.common import COL_MULT, DROPOUT_BITS, FMIX_C1, FMIX_C2, ROW_MULT, dropout_keep
from lora_kernels.ops import dropout_keep_mask
from lora_kernels.ops.dropout_mask import drop_threshold
from lora_kernels.ops.triton_launch import is_interpreted

if is_interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or a CUDA device"),
              pytest.mark.usefixtures("poisoned")]

SEEDS = [0, 1, 12345, 2**31 + 3, 2**32 - 1, 2**32, 2**32 + 7, 0x1234_5678_9ABC_DEF, 2**62 - 2, 2**62 - 1]


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, M, K, row0, col0, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[i, j] = dropout_keep(row0 + i, col0 + j) for the [M, K] window (global indices)."""
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed_ptr, row0 + local_m, col0 + local_k, threshold)
    mask = (local_m[:, None] < M) & (local_k[None, :] < K)
    tl.store(out_ptr + local_m[:, None] * K + local_k[None, :], keep.to(tl.int8), mask=mask)


def triton_mask(seed: int, M: int, K: int, p: float, row0: int = 0, col0: int = 0,
                block_m: int = 16, block_k: int = 32) -> torch.Tensor:
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    out = torch.full((M, K), -1, dtype=torch.int8, device=DEVICE)  # -1: not written
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _mask_kernel[grid](seed_t, out, M, K, row0, col0, drop_threshold(p), BLOCK_M=block_m, BLOCK_K=block_k)
    out = out.cpu()
    assert ((out == 0) | (out == 1)).all(), "kernel left elements unwritten or wrote non-bool values"
    return out.bool()


def spec_mask(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    return dropout_keep_mask(torch.tensor([seed], dtype=torch.int64), M, K, p)


# An independent pure-Python version of the hash (Python ints, explicit 32-bit wrap) -----------
_M32 = 0xFFFFFFFF


def _py_fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * FMIX_C1) & _M32
    h ^= h >> 13
    h = (h * FMIX_C2) & _M32
    return h ^ (h >> 16)


def py_keep(seed: int, row: int, col: int, p: float) -> bool:
    lo, hi = seed & _M32, (seed >> 32) & _M32
    row_key = _py_fmix32((row * ROW_MULT + lo) & _M32) ^ hi
    bits = _py_fmix32((row_key + col * COL_MULT) & _M32)
    return (bits >> (32 - DROPOUT_BITS)) >= round(p * (1 << DROPOUT_BITS))


def test_hash_constants_match_the_jit_function():
    # dropout_keep writes its constants as literals; they must be the ones the spec imports.
    import inspect
    src = inspect.getsource(dropout_keep.fn if hasattr(dropout_keep, "fn") else dropout_keep)
    assert hex(ROW_MULT).upper()[2:] in src.upper() and hex(COL_MULT).upper()[2:] in src.upper()


@pytest.mark.parametrize("seed", SEEDS)
def test_spec_matches_pure_python_hash(seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    rows = torch.randint(0, 300, (40,), generator=gen).tolist()
    cols = torch.randint(0, 300, (40,), generator=gen).tolist()
    mask = spec_mask(seed, 300, 300, 0.5)
    for m, k in zip(rows, cols):
        assert bool(mask[m, k]) == py_keep(seed, m, k, 0.5), (seed, m, k)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 45), (37, 1), (37, 45), (70, 129)])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.77])
def test_triton_mask_matches_torch_spec(seed, shape, p):
    M, K = shape
    assert torch.equal(triton_mask(seed, M, K, p), spec_mask(seed, M, K, p))


@pytest.mark.parametrize("seed", [7, 2**40 + 11, 2**62 - 1])
@pytest.mark.parametrize("offsets", [(5, 3), (16, 32), (1000, 77), (513, 1029)])
def test_triton_mask_at_offsets_matches_spec(seed, offsets):
    # The kernels pass global row/column indices of a tile; a window of the mask computed at an
    # offset must be that window of the full mask.
    row0, col0 = offsets
    M, K = 21, 35
    full = spec_mask(seed, row0 + M, col0 + K, 0.4)
    assert torch.equal(triton_mask(seed, M, K, 0.4, row0, col0), full[row0:, col0:])


@pytest.mark.parametrize("seed", [3, 2**62 - 1])
def test_triton_mask_at_huge_row_indices(seed):
    # Rows near 2**31 (the int32 limit of row offsets): row * ROW_MULT must wrap mod 2**32.
    row0, col0, M, K = 2**31 - 40, 2**20 + 5, 24, 20
    got = triton_mask(seed, M, K, 0.5, row0, col0)
    want = torch.tensor([[py_keep(seed, row0 + i, col0 + j, 0.5) for j in range(K)] for i in range(M)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 16)])
def test_mask_independent_of_tiling(block):
    seed = 2**33 + 99
    a = triton_mask(seed, 67, 91, 0.25, block_m=block[0], block_k=block[1])
    assert torch.equal(a, spec_mask(seed, 67, 91, 0.25))


def test_threshold_edges():
    seed = 424242
    assert spec_mask(seed, 33, 17, 0.0).all()
    assert triton_mask(seed, 33, 17, 0.0).all()
    # drop probability is round(p * 2**24) / 2**24: a tiny p that rounds to 0 drops nothing
    assert triton_mask(seed, 33, 17, 1e-9).all()
    # masks are nested in p: anything kept at a higher p is kept at a lower p (same hash bits)
    lo, hi = triton_mask(seed, 40, 50, 0.2), triton_mask(seed, 40, 50, 0.6)
    assert (hi & ~lo).sum() == 0 and (lo & ~hi).sum() > 0


def _binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [17, 2**61 + 5])
def test_keep_rate_and_no_row_column_structure(p, seed):
    M, K = 128, 192
    keep = triton_mask(seed, M, K, p, block_m=64, block_k=64).double()
    n = keep.numel()
    q = 1 - p
    assert abs(keep.mean().item() - q) < _binomial_tol(p, n)
    # Row means and column means spread like binomial means: not constant per row (std too small)
    # and not correlated within rows/columns (std too large).
    for means, count in ((keep.mean(1), K), (keep.mean(0), M)):
        ratio = means.std().item() / math.sqrt(p * (1 - p) / count)
        assert 0.7 < ratio < 1.3, ratio
    # Neighbouring rows / columns agree as often as independent draws would: q^2 + p^2.
    agree = q * q + p * p
    for a, b, count in ((keep[1:], keep[:-1], (M - 1) * K), (keep[:, 1:], keep[:, :-1], M * (K - 1)),
                        (keep[1:, 1:], keep[:-1, :-1], (M - 1) * (K - 1))):  # diagonal shift
        rate = (a == b).double().mean().item()
        assert abs(rate - agree) < _binomial_tol(agree, count), rate


def test_different_seeds_give_unrelated_masks():
    base = 0x0123_4567_89AB_CDEF
    ref = triton_mask(base, 48, 64, 0.5)
    for other in (base + 1, base ^ (1 << 31), base ^ (1 << 32), base ^ (1 << 61), base + 2**32):
        diff = (triton_mask(other, 48, 64, 0.5) != ref).double().mean().item()
        # independent masks disagree on 2 p (1 - p) = 1/2 of the elements
        assert abs(diff - 0.5) < _binomial_tol(0.5, 48 * 64), (hex(other), diff)
