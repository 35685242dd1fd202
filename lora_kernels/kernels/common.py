"""Device helpers shared by the LoRA kernels: tile dots, grouped tile order, dropout hash.

The dropout keep-mask is a counter-based hash of (seed, row, column), so forward and backward
regenerate the identical mask from an 8-byte seed instead of storing it. The same function is
written in PyTorch in ``lora_kernels.ops.dropout_mask`` (the spec); tests check they agree bit for bit.
"""
import triton
import triton.language as tl

# Hash constants (murmur3 fmix32 and two odd multipliers). Shared with the PyTorch implementation.
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
ROW_MULT = 0x9E3779B1
COL_MULT = 0x85EBCA77
# A value is dropped when the top 24 bits of its hash are below round(p * 2**24).
DROPOUT_BITS = 24


@triton.jit
def fmix32(h):
    """murmur3 finalizer on uint32 (wrapping arithmetic)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(seed_ptr, offs_m, offs_k, drop_threshold):
    """Keep-mask [len(offs_m), len(offs_k)] for global row/column indices; True = keep."""
    seed = tl.load(seed_ptr)
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    row_key = fmix32(offs_m.to(tl.uint32) * 0x9E3779B1 + lo) ^ hi
    bits = fmix32(row_key[:, None] + offs_k.to(tl.uint32)[None, :] * 0x85EBCA77)
    return (bits >> 8).to(tl.int32) >= drop_threshold


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    UPCAST_DOT is set only under TRITON_INTERPRET=1 with bf16 tiles: the interpreter's tl.dot
    multiplies raw bf16 bit patterns (triton#11584), while an fp32 dot of the same values is exact.
    """
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n) so GROUP_M row-tiles share column-tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n) of an [M, N] output: (offs_m, offs_n, m_mask, n_mask, rows, cols), rows and
    cols being the offsets as int64 (addresses of tensors past 2**31 elements)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N, offs_m.to(tl.int64), offs_n.to(tl.int64)


@triton.jit
def rank_dot(left_ptr, right_ptr, rows, cols, row_mask, col_mask, r_live, stride_left_row, stride_left_r,
             stride_right_r, stride_right_col, R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_ROWS: tl.constexpr,
             BLOCK_COLS: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """left[rows, :r] @ right[:r, cols] as an fp32 tile [BLOCK_ROWS, BLOCK_COLS]: the rank products of
    the LoRA terms (h @ B^T in the forward, dH @ A for dX). The padded rank R runs in R_CHUNK steps
    (bounds registers); ranks >= r_live are masked to zero; left is cast to right's dtype (the
    adapters')."""
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for r0 in range(0, R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_mask = offs_r < r_live
        left = tl.load(left_ptr + rows[:, None] * stride_left_row + offs_r[None, :] * stride_left_r,
                       mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        right = tl.load(right_ptr + offs_r[:, None] * stride_right_r + cols[None, :] * stride_right_col,
                        mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(left.to(right_ptr.dtype.element_ty), right, acc, LORA_PRECISION, UPCAST_DOT)
    return acc
