"""Forward kernels of the fused LoRA linear.

    h = dropout(x) @ A^T                          lora_shrink_kernel     [M, r]
    y = x @ W^T + scale * h @ B^T + bias          lora_forward_gemm_kernel [M, N]
                                                  (lora_forward_gemm_tma_kernel: the same, TMA loads)

The GEMM starts its fp32 accumulator from scale * h @ B^T (one dot over the rank, chunked by
R_CHUNK to bound registers) and then runs the K-loop of x @ W^T, so no M x N intermediate is
written besides y. ``bias`` is already bias + scale * lora_B_bias (combined on the host).
With W_NF4 the base weight is bitsandbytes NF4 (w_ptr = packed codes) and its tiles are decoded
inside the K-loop (``kernels.nf4``); the wq_* pointers are unused (None) for dense weights.
Small M (decoding, small batches) is weight-bandwidth bound: the same GEMM then runs split-K over a
second grid axis into fp32 partials that the launcher sums in a fixed order (deterministic).
LoRA dots run in the adapters' dtype (fp32 adapters with 16-bit x: tf32 dots, like PEFT's fp32
LoRA branch to within tf32 rounding), base dots in x's dtype; all accumulate in fp32.
Rank dimensions are padded to the power of two R >= 16 (tl.dot's minimum) and masked with r.
"""
import triton
import triton.language as tl

from lora_kernels.kernels.common import dropout_keep, grouped_tile, mma, rank_dot, tile_offsets
from lora_kernels.kernels.nf4 import load_weight_tile, nf4_tile_halves


@triton.jit
def h_step(acc_h, x, seed_ptr, offs_m, offs_k, k_mask, a_ptr, offs_r, r_mask, stride_ar, stride_ak, drop_threshold,
           HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc_h + (mask * x) @ A[:, offs_k]^T for one x tile [BLOCK_M, BLOCK_K] (unscaled dropout: the
    1/(1-p) is applied once to the finished h), in the adapters' dtype."""
    if HAS_DROPOUT:
        keep = dropout_keep(seed_ptr, offs_m, offs_k, drop_threshold)
        x = x * keep.to(x.dtype)  # not tl.where: a NaN/inf in a dropped element stays NaN, as x * mask in PyTorch
    a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                  mask=r_mask[None, :] & k_mask[:, None], other=0.0)
    return mma(x.to(a_ptr.dtype.element_ty), a_t, acc_h, LORA_PRECISION, UPCAST_DOT)


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, r,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    drop_threshold, keep_scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # The rank as the tile's second axis (its int64 offsets go unused).
    offs_m, offs_r, m_mask, r_mask, rows, _ = tile_offsets(tl.program_id(0), 0, M, r, BLOCK_M, R)
    acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = h_step(acc, x, seed_ptr, offs_m, offs_k, k_mask, a_ptr, offs_r, r_mask, stride_ar, stride_ak,
                     drop_threshold, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
    if HAS_DROPOUT:
        # dropout(x) = mask * x / (1 - p); the scale is linear, so it is applied once here.
        acc = acc * keep_scale
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
             acc.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def lora_forward_gemm_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, y_ptr,
    wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
    M, N, K, r, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_bn, stride_br, stride_ys, stride_ym, stride_yn,
    scale,
    R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    W_NF4: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    W_STORED_DTYPE: tl.constexpr, NF4_ALIGNED: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # Split-K (small M): program_id(1) takes K range [pid_s * k_per_split, ...) and writes an fp32
    # partial at y_ptr + pid_s * stride_ys; the LoRA term and bias belong to split 0 only.
    if SPLIT_K:
        pid_s = tl.program_id(1)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        r_live = tl.where(pid_s == 0, r, 0)
    else:
        k_start = 0
        k_end = K
        r_live = r
    offs_m, offs_n, m_mask, n_mask, rows, cols = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)

    # LoRA term first. With split-K only split 0 reads h and B (r_live masks the loads, keeping the
    # rank loop unrolled); the others start at 0.
    acc = rank_dot(h_ptr, b_ptr, rows, cols, m_mask, n_mask, r_live, stride_hm, stride_hr, stride_br, stride_bn,
                   R, R_CHUNK, BLOCK_M, BLOCK_N, LORA_PRECISION, UPCAST_DOT) * scale

    # Base GEMM continues in the same accumulator (no h here: the shrink kernel computed it).
    acc, _ = gemm_k_loop(acc, k_start, k_end, x_ptr, w_ptr, h_ptr, h_ptr, rows, offs_m, m_mask, cols, n_mask,
                         offs_m, m_mask, K, stride_xm, stride_xk, stride_wn, stride_wk, 0, 0, 0,
                         wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
                         acc, BLOCK_K, False, False, DOT_PRECISION, LORA_PRECISION, UPCAST_DOT, W_NF4, QBLOCK,
                         QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE, NF4_ALIGNED)

    bias_mask = n_mask
    if SPLIT_K:
        # The bias belongs to split 0. An integer bound, not n_mask & (pid_s == 0): the interpreter
        # rejects scalar-bool masks.
        bias_mask = offs_n < tl.where(pid_s == 0, N, 0)
        y_ptr += pid_s.to(tl.int64) * stride_ys
    bias_and_store(acc, bias_ptr, y_ptr, rows, cols, offs_n, m_mask, n_mask, bias_mask, stride_ym, stride_yn,
                   HAS_BIAS)


@triton.jit
def bias_and_store(acc, bias_ptr, y_ptr, rows, cols, offs_n, m_mask, n_mask, bias_mask, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr):
    """y tile = acc (+ bias[offs_n] where bias_mask), stored in y's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=bias_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def lora_forward_gemm_tma_kernel(
    x_desc, w_desc, h_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, r,
    stride_hm, stride_hr, stride_bn, stride_br, stride_ym, stride_yn,
    scale,
    R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``lora_forward_gemm_kernel`` (dense W, no split-K) with x and W tiles brought in by TMA
    (host-made descriptors x [M, K], W [N, K]; the hardware zero-fills out-of-bounds rows and
    columns, so the K-loop has no masks and no address arithmetic). Hopper and newer."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m, offs_n, m_mask, n_mask, rows, cols = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    acc = rank_dot(h_ptr, b_ptr, rows, cols, m_mask, n_mask, r, stride_hm, stride_hr, stride_br, stride_bn,
                   R, R_CHUNK, BLOCK_M, BLOCK_N, LORA_PRECISION, UPCAST_DOT) * scale
    for k0 in range(0, x_desc.shape[1], BLOCK_K):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc = mma(x, w.T, acc, DOT_PRECISION, UPCAST_DOT)
    bias_and_store(acc, bias_ptr, y_ptr, rows, cols, offs_n, m_mask, n_mask, n_mask, stride_ym, stride_yn,
                   HAS_BIAS)


@triton.jit
def gemm_k_loop(acc, k_start, k_end, x_ptr, w_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask, cols, n_mask, offs_r,
                r_mask, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, drop_threshold,
                wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
                acc_h, BLOCK_K: tl.constexpr, WITH_H: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                UPCAST_DOT: tl.constexpr, W_NF4: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, W_STORED_DTYPE: tl.constexpr, NF4_ALIGNED: tl.constexpr):
    """K-loop of one y tile over [k_start, k_end): (acc + x @ W^T, acc_h); with WITH_H also
    acc_h += dropout(x) @ A^T from the same x tiles (``h_step``). W dense or NF4 (decoded per tile;
    NF4_ALIGNED: k_start and k_end multiples of BLOCK_K, see ``nf4_k_step``)."""
    for k0 in range(k_start, k_end, BLOCK_K):
        if W_NF4 and NF4_ALIGNED:
            acc, acc_h = nf4_k_step(acc, acc_h, k0, x_ptr, w_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask, cols, n_mask,
                                    offs_r, r_mask, K, stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold,
                                    wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr,
                                    wq_code_ptr, BLOCK_K, WITH_H, HAS_DROPOUT, DOT_PRECISION, LORA_PRECISION,
                                    UPCAST_DOT, QBLOCK, QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w_t = load_weight_tile(w_ptr, cols[None, :], offs_k.to(tl.int64)[:, None],
                                   k_mask[:, None] & n_mask[None, :], stride_wn, stride_wk, K,
                                   wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr,
                                   wq_absmax_offset_ptr, wq_code_ptr, W_NF4, QBLOCK, QBLOCK2, DOUBLE_QUANT,
                                   W_STORED_DTYPE, x_ptr.dtype.element_ty)
            acc = mma(x, w_t, acc, DOT_PRECISION, UPCAST_DOT)
            if WITH_H:
                acc_h = h_step(acc_h, x, seed_ptr, offs_m, offs_k, k_mask, a_ptr, offs_r, r_mask, stride_ar,
                               stride_ak, drop_threshold, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
    return acc, acc_h


@triton.jit
def nf4_k_step(acc, acc_h, k0, x_ptr, w_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask, cols, n_mask, offs_r, r_mask, K,
               stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold,
               wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
               BLOCK_K: tl.constexpr, WITH_H: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, W_STORED_DTYPE: tl.constexpr):
    """One K step [k0, k0 + BLOCK_K) of an aligned NF4 weight, whole (K % BLOCK_K == 0): the weight
    bytes are read as a tile contiguous along K and both nibbles decoded (``nf4_tile_halves``); the
    even and odd columns of x then meet them in two dots of BLOCK_K / 2 (a sum over K in any order),
    so the decoded values never need interleaving."""
    offs_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
    k_mask = offs_even < K
    w_even, w_odd = nf4_tile_halves(w_ptr, wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr,
                                    wq_code_ptr, cols, n_mask, k0, K, BLOCK_K, QBLOCK, QBLOCK2, DOUBLE_QUANT,
                                    W_STORED_DTYPE)
    acc, acc_h = _half_k_step(acc, acc_h, w_even, offs_even, k_mask, x_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask,
                              offs_r, r_mask, stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold, WITH_H,
                              HAS_DROPOUT, DOT_PRECISION, LORA_PRECISION, UPCAST_DOT)
    return _half_k_step(acc, acc_h, w_odd, offs_even + 1, k_mask, x_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask,
                        offs_r, r_mask, stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold, WITH_H,
                        HAS_DROPOUT, DOT_PRECISION, LORA_PRECISION, UPCAST_DOT)


@triton.jit
def _half_k_step(acc, acc_h, w, offs_k, k_mask, x_ptr, a_ptr, seed_ptr, rows, offs_m, m_mask, offs_r, r_mask,
                 stride_xm, stride_xk, stride_ar, stride_ak, drop_threshold, WITH_H: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
                 UPCAST_DOT: tl.constexpr):
    """acc += x[:, offs_k] @ w^T for decoded weight columns w [BLOCK_N, len(offs_k)] (and h from the same x)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    acc = mma(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, DOT_PRECISION, UPCAST_DOT)
    if WITH_H:
        acc_h = h_step(acc_h, x, seed_ptr, offs_m, offs_k, k_mask, a_ptr, offs_r, r_mask, stride_ar, stride_ak,
                       drop_threshold, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
    return acc, acc_h


@triton.jit
def _fused_store_tile(acc, h, b_ptr, bias_ptr, y_ptr, rows, cols, m_mask, n_mask, offs_n, offs_r, r_mask, scale,
                      stride_bn, stride_br, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """y tile = acc + scale * h @ B^T (+ bias), stored in y's dtype. The rank dot accumulates into
    acc itself, brought to 1/scale units and back (no second [BLOCK_M, BLOCK_N] fp32 tile in
    registers; exact when scale is a power of two, else within an fp32 ulp; scale != 0)."""
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                  mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = mma(h, b_t, acc * (1.0 / scale), LORA_PRECISION, UPCAST_DOT) * scale
    bias_and_store(acc, bias_ptr, y_ptr, rows, cols, offs_n, m_mask, n_mask, n_mask, stride_ym, stride_yn,
                   HAS_BIAS)


@triton.jit
def lora_forward_fused_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr, seed_ptr,
    wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
    M, N, K, r, n_groups,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_hm, stride_hr,
    stride_bn, stride_br, stride_ym, stride_yn,
    drop_threshold, keep_scale, scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    W_NF4: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    W_STORED_DTYPE: tl.constexpr, NF4_ALIGNED: tl.constexpr,
):
    """One launch for the whole forward (large M): program (pid_m, g) computes the y tiles of row
    block pid_m at column tiles g, g + n_groups, ... While it runs the K-loop of its first tile it
    also accumulates h = dropout(x) @ A^T from the x tiles it loads anyway, so x is read from memory
    once (the two-launch forward reads it a second time in the shrink kernel); h then serves every
    tile of the program (added after the K-loop) and group 0 writes it for the backward. Each group
    recomputes h for its rows: n_groups * r / N extra tensor-core work."""
    pid_g = tl.program_id(1)
    offs_m, offs_r, m_mask, r_mask, rows, _ = tile_offsets(tl.program_id(0), 0, M, r, BLOCK_M, R)
    acc_h = tl.zeros([BLOCK_M, R], dtype=tl.float32)

    offs_n = pid_g * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    acc, acc_h = gemm_k_loop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), 0, K, x_ptr, w_ptr, a_ptr, seed_ptr,
                             rows, offs_m, m_mask, cols, n_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_wn,
                             stride_wk, stride_ar, stride_ak, drop_threshold, wq_absmax_ptr, wq_absmax_code_ptr,
                             wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr, acc_h, BLOCK_K, True,
                             HAS_DROPOUT, DOT_PRECISION, LORA_PRECISION, UPCAST_DOT, W_NF4, QBLOCK, QBLOCK2,
                             DOUBLE_QUANT, W_STORED_DTYPE, NF4_ALIGNED)
    if HAS_DROPOUT:
        acc_h = acc_h * keep_scale  # dropout(x) = mask * x / (1 - p): linear, applied once
    # Rounded to h's dtype (the adapters') as the two-launch forward stores and reloads it.
    h = acc_h.to(h_ptr.dtype.element_ty)
    # Integer bound, not m_mask & (pid_g == 0): the interpreter rejects scalar-bool masks.
    h_rows = tl.where(pid_g == 0, M, 0)
    tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr, h,
             mask=(offs_m < h_rows)[:, None] & r_mask[None, :])
    _fused_store_tile(acc, h, b_ptr, bias_ptr, y_ptr, rows, cols, m_mask, n_mask, offs_n, offs_r, r_mask, scale,
                      stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, LORA_PRECISION, UPCAST_DOT)

    for n0 in range((pid_g + n_groups) * BLOCK_N, N, n_groups * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        cols = offs_n.to(tl.int64)
        acc, acc_h = gemm_k_loop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), 0, K, x_ptr, w_ptr, a_ptr,
                                 seed_ptr, rows, offs_m, m_mask, cols, n_mask, offs_r, r_mask, K, stride_xm, stride_xk,
                                 stride_wn, stride_wk, stride_ar, stride_ak, drop_threshold, wq_absmax_ptr,
                                 wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr, acc_h,
                                 BLOCK_K, False, HAS_DROPOUT, DOT_PRECISION, LORA_PRECISION, UPCAST_DOT, W_NF4,
                                 QBLOCK, QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE, NF4_ALIGNED)
        _fused_store_tile(acc, h, b_ptr, bias_ptr, y_ptr, rows, cols, m_mask, n_mask, offs_n, offs_r, r_mask,
                          scale, stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, LORA_PRECISION, UPCAST_DOT)
