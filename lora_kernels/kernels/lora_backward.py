"""Backward kernels of the fused LoRA linear (deterministic: no atomics).

    lora_grad_out_pass_kernel   one read of dY gives, per (N-tile, M-split) program:
                                  dH partials  scale * dY @ B      -> dh_ws     [N_tiles, M, r]
                                  dB partials  scale * dY^T @ h    -> db_ws     [M_splits, N, r]
                                  column sums  sum_m dY            -> colsum_ws [M_splits, N]
                                the host reduces the partials with torch.sum in a fixed order
                                (scaled here: no host multiply, one launch less per gradient).
    lora_grad_input_kernel      dX = keep * (dH @ A) / (1-p) + dY @ W: the accumulator starts from
                                the masked LoRA term and continues with the N-loop (one GEMM);
                                W dense or NF4 (tiles decoded in the loop, W_NF4).
    lora_grad_input_tma_kernel  the same for dense W with dY and W tiles loaded by TMA (sm_90).
    lora_grad_a_kernel          dA partials keep_scale * dH^T @ dropout(x) per M-split
                                -> da_ws [M_splits, r, K] (keep_scale = 1 / (1 - p)).

dH arrives already multiplied by scale (fp32); dropout masks are regenerated from the seed.
LoRA dots run in the adapters' dtype, the dY @ W dot in dY's dtype; all accumulate in fp32.
"""
import triton
import triton.language as tl

from lora_kernels.kernels.common import dropout_keep, grouped_tile, mma, rank_dot, tile_offsets
from lora_kernels.kernels.nf4 import load_weight_tile, nf4_tile_halves


@triton.jit
def lora_grad_out_pass_kernel(
    dy_ptr, b_ptr, h_ptr, dh_ws_ptr, db_ws_ptr, colsum_ws_ptr,
    M, N, r, rows_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr,
    scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DB: tl.constexpr, NEED_COLSUM: tl.constexpr,
    LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n, offs_r, n_mask, r_mask, cols, _ = tile_offsets(pid_n, 0, N, r, BLOCK_N, R)
    lora_dtype = b_ptr.dtype.element_ty

    if NEED_DH:
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    db_acc = tl.zeros([BLOCK_N, R], dtype=tl.float32)
    colsum_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        rows = offs_m.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        dy_lora = dy.to(lora_dtype)
        if NEED_DH:
            dh = mma(dy_lora, b, tl.zeros([BLOCK_M, R], dtype=tl.float32), LORA_PRECISION, UPCAST_DOT)
            dh_base = dh_ws_ptr + pid_n.to(tl.int64) * M * r
            tl.store(dh_base + rows[:, None] * r + offs_r[None, :], dh * scale,
                     mask=m_mask[:, None] & r_mask[None, :])
        if NEED_DB:
            h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            db_acc = mma(tl.trans(dy_lora), h, db_acc, LORA_PRECISION, UPCAST_DOT)
        if NEED_COLSUM:
            colsum_acc += tl.sum(dy.to(tl.float32), axis=0)

    if NEED_DB:
        db_base = db_ws_ptr + pid_s.to(tl.int64) * N * r
        tl.store(db_base + cols[:, None] * r + offs_r[None, :], db_acc * scale,
                 mask=n_mask[:, None] & r_mask[None, :])
    if NEED_COLSUM:
        tl.store(colsum_ws_ptr + pid_s.to(tl.int64) * N + cols, colsum_acc, mask=n_mask)


@triton.jit
def lora_grad_input_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, seed_ptr, dx_ptr,
    wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr, wq_code_ptr,
    M, N, K, r,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dhm, stride_dhr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    drop_threshold, keep_scale,
    R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    W_NF4: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    W_STORED_DTYPE: tl.constexpr, NF4_ALIGNED: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m, offs_k, m_mask, k_mask, rows, ks = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    if W_NF4 and NF4_ALIGNED:
        # The tile decode (K % QBLOCK == 0, QBLOCK % BLOCK_K == 0: every K tile whole): the weight
        # bytes read contiguously along K give the even and odd columns of the dX tile separately,
        # so the tile is two accumulators [BLOCK_M, BLOCK_K / 2] stored to interleaved columns.
        offs_even = pid_k * BLOCK_K + 2 * tl.arange(0, BLOCK_K // 2)
        k_mask = offs_even < K
        acc_even = dx_lora_term(dh_ptr, a_ptr, seed_ptr, offs_m, offs_even, m_mask, k_mask, rows,
                                offs_even.to(tl.int64), r, stride_dhm, stride_dhr, stride_ar, stride_ak, drop_threshold,
                                keep_scale, R, R_CHUNK, BLOCK_M, BLOCK_K // 2, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
        acc_odd = dx_lora_term(dh_ptr, a_ptr, seed_ptr, offs_m, offs_even + 1, m_mask, k_mask, rows,
                               offs_even.to(tl.int64) + 1, r, stride_dhm, stride_dhr, stride_ar, stride_ak,
                               drop_threshold, keep_scale, R, R_CHUNK, BLOCK_M, BLOCK_K // 2, HAS_DROPOUT,
                               LORA_PRECISION, UPCAST_DOT)
        for n0 in range(0, N, BLOCK_N):
            dy, ns, n_mask = _dy_tile(dy_ptr, rows, m_mask, n0, N, stride_dym, stride_dyn, BLOCK_N)
            w_even, w_odd = nf4_tile_halves(w_ptr, wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr,
                                            wq_absmax_offset_ptr, wq_code_ptr, ns, n_mask, pid_k * BLOCK_K, K, BLOCK_K,
                                            QBLOCK, QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE)
            acc_even = mma(dy, w_even.to(dy_ptr.dtype.element_ty), acc_even, DOT_PRECISION, UPCAST_DOT)
            acc_odd = mma(dy, w_odd.to(dy_ptr.dtype.element_ty), acc_odd, DOT_PRECISION, UPCAST_DOT)
        out_mask = m_mask[:, None] & k_mask[None, :]
        dx_rows = dx_ptr + rows[:, None] * stride_dxm
        tl.store(dx_rows + offs_even.to(tl.int64)[None, :] * stride_dxk, acc_even.to(dx_ptr.dtype.element_ty),
                 mask=out_mask)
        tl.store(dx_rows + (offs_even.to(tl.int64) + 1)[None, :] * stride_dxk, acc_odd.to(dx_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        acc = dx_lora_term(dh_ptr, a_ptr, seed_ptr, offs_m, offs_k, m_mask, k_mask, rows, ks, r,
                           stride_dhm, stride_dhr, stride_ar, stride_ak, drop_threshold, keep_scale,
                           R, R_CHUNK, BLOCK_M, BLOCK_K, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
        # Base term dY @ W continues in the same accumulator.
        for n0 in range(0, N, BLOCK_N):
            dy, ns, n_mask = _dy_tile(dy_ptr, rows, m_mask, n0, N, stride_dym, stride_dyn, BLOCK_N)
            w = load_weight_tile(w_ptr, ns[:, None], ks[None, :], n_mask[:, None] & k_mask[None, :],
                                 stride_wn, stride_wk, K,
                                 wq_absmax_ptr, wq_absmax_code_ptr, wq_absmax_scale_ptr, wq_absmax_offset_ptr,
                                 wq_code_ptr, W_NF4, QBLOCK, QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE,
                                 dy_ptr.dtype.element_ty)
            acc = mma(dy, w, acc, DOT_PRECISION, UPCAST_DOT)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _dy_tile(dy_ptr, rows, m_mask, n0, N, stride_dym, stride_dyn, BLOCK_N: tl.constexpr):
    """(dY[rows, n0:n0 + BLOCK_N] with 0 outside, the columns as int64, their mask)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ns = offs_n.to(tl.int64)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                 mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    return dy, ns, n_mask


@triton.jit
def dx_lora_term(dh_ptr, a_ptr, seed_ptr, offs_m, offs_k, m_mask, k_mask, rows, ks, r,
                 stride_dhm, stride_dhr, stride_ar, stride_ak, drop_threshold, keep_scale,
                 R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The LoRA term of a dX tile [BLOCK_M, BLOCK_K] through dropout: keep * (dH @ A) / (1 - p), fp32,
    over the padded rank R in R_CHUNK steps, in the adapters' dtype."""
    acc = rank_dot(dh_ptr, a_ptr, rows, ks, m_mask, k_mask, r, stride_dhm, stride_dhr, stride_ar, stride_ak,
                   R, R_CHUNK, BLOCK_M, BLOCK_K, LORA_PRECISION, UPCAST_DOT)
    if HAS_DROPOUT:
        keep = dropout_keep(seed_ptr, offs_m, offs_k, drop_threshold)
        # A select, so a NaN of dH·A where dropped becomes 0 (PyTorch's x * mask keeps it): the forms
        # that keep it cost registers and spill in some configurations (aot_check).
        acc = tl.where(keep, acc * keep_scale, 0.0)
    return acc


@triton.jit
def lora_grad_input_tma_kernel(
    dy_desc, w_desc, dh_ptr, a_ptr, seed_ptr, dx_ptr,
    M, K, r,
    stride_dhm, stride_dhr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    drop_threshold, keep_scale,
    R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``lora_grad_input_kernel`` (dense W) with dY and W tiles brought in by TMA (host-made
    descriptors dY [M, N], W [N, K]; out-of-bounds parts zero-filled by the hardware, so the
    N-loop has no masks). Hopper and newer."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m, offs_k, m_mask, k_mask, rows, ks = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    acc = dx_lora_term(dh_ptr, a_ptr, seed_ptr, offs_m, offs_k, m_mask, k_mask, rows, ks, r,
                       stride_dhm, stride_dhr, stride_ar, stride_ak, drop_threshold, keep_scale,
                       R, R_CHUNK, BLOCK_M, BLOCK_K, HAS_DROPOUT, LORA_PRECISION, UPCAST_DOT)
    for n0 in range(0, dy_desc.shape[1], BLOCK_N):
        dy = dy_desc.load([pid_m * BLOCK_M, n0])
        w = w_desc.load([n0, pid_k * BLOCK_K])
        acc = mma(dy, w, acc, DOT_PRECISION, UPCAST_DOT)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def lora_grad_a_kernel(
    x_ptr, dh_ptr, seed_ptr, da_ws_ptr,
    M, K, r, rows_per_split,
    stride_xm, stride_xk, stride_dhm, stride_dhr,
    drop_threshold, keep_scale,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    k_mask = offs_k < K
    r_mask = offs_r < r
    ks = offs_k.to(tl.int64)
    # The adapters' dtype: fp32 when LORA_FP32, else x's dtype.
    lora_dtype = tl.float32 if LORA_FP32 else x_ptr.dtype.element_ty
    acc = tl.zeros([R, BLOCK_K], dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        rows = offs_m.to(tl.int64)
        dh_t = tl.load(dh_ptr + offs_r[:, None] * stride_dhr + rows[None, :] * stride_dhm,
                       mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed_ptr, offs_m, offs_k, drop_threshold)
            x = tl.where(keep, x, 0.0)  # a select (NaN where dropped becomes 0): the multiply spills (aot_check)
        acc = mma(dh_t.to(lora_dtype), x.to(lora_dtype), acc, LORA_PRECISION, UPCAST_DOT)
    da_base = da_ws_ptr + pid_s.to(tl.int64) * r * K
    tl.store(da_base + offs_r[:, None] * K + ks[None, :], acc * keep_scale,
             mask=r_mask[:, None] & k_mask[None, :])
