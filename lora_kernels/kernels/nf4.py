"""NF4 decoding on the device: bitsandbytes' 4-bit NormalFloat format, block size QBLOCK.

The weight is flattened row-major; element i has its 4-bit code in byte i // 2 (the even element
in the high nibble) and its scale in block i // QBLOCK. With double quantization the block scale is
itself stored as a uint8 code of bnb's dynamic map:
    absmax_f32[b] = fl(code2[q[b]] * absmax2[b // QBLOCK2]) + offset
and a weight value is fl32(NF4[code] * absmax_f32) rounded once to the stored dtype. This is
bitsandbytes' dequantize_4bit to the bit, provided the multiply and the add are not contracted
into one FMA: every launch of a kernel that decodes NF4 passes enable_fp_fusion=False.

Two decoders: ``nf4_decode`` works on flat element indices, so blocks that span rows
(K % QBLOCK != 0) and odd K need no special case; ``nf4_tile_halves`` decodes tiles of *aligned*
weights (K % QBLOCK == 0, every Llama shape) from byte tiles contiguous along K, one scale per
row, and is what the GEMMs and the slab decode use for them (several times faster: coalesced
loads, half the loads, no per-element block index).
"""
import triton
import triton.language as tl


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
               idx, mask, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
               STORED_DTYPE: tl.constexpr):
    """Weight values at flat int64 indices ``idx`` (any shape), rounded to STORED_DTYPE; 0 where masked."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = ((idx & 1) ^ 1).to(tl.int32) * 4  # even element: high nibble
    q = (byte >> shift) & 0xF
    value = tl.load(code_ptr + q, mask=mask, other=0.0)
    absmax = block_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, idx // QBLOCK, mask,
                          QBLOCK2, DOUBLE_QUANT)
    return round_to(value * absmax, STORED_DTYPE)


@triton.jit
def block_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, block, mask,
                 QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 scales of quantization blocks ``block`` (int64, any shape); 0 where masked."""
    if DOUBLE_QUANT:
        q_absmax = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(absmax_code_ptr + q_absmax, mask=mask, other=0.0) \
            * tl.load(absmax_scale_ptr + block // QBLOCK2, mask=mask, other=0.0)
        absmax = absmax + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_tile_halves(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
                    cols, n_mask, k0, K, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, STORED_DTYPE: tl.constexpr):
    """The tile W[cols, k0:k0 + BLOCK_K] of an *aligned* weight, split by parity: (W[cols, k0 + 2j],
    W[cols, k0 + 2j + 1]) for j < BLOCK_K / 2, each [len(cols), BLOCK_K // 2] in STORED_DTYPE (rows
    outside n_mask: 0). Aligned: K % QBLOCK == 0 and the tile inside one quantization block per row
    (QBLOCK % BLOCK_K == 0, k0 % BLOCK_K == 0). Bit-identical to ``nf4_decode``, at a fraction of its
    work: the bytes are one tile contiguous along K (coalesced, vectorized loads; per-element byte
    addresses are not, since two elements share a byte), each byte gives both values, and each row
    one scale (no per-element 64-bit block index). This is the decode inside the GEMM K-loops, where
    it runs once per weight element per row block of x, and of the large-M path's slabs. Consumers
    take the halves as they are (a dot over K in two halves) or interleave them (tl.join): an
    interleaved tile as a Hopper wgmma operand fails to lower in triton 3.6."""
    row_start = cols * K + k0
    byte = tl.load(packed_ptr + ((row_start >> 1)[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]),
                   mask=n_mask[:, None], other=0).to(tl.int32)
    absmax = block_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                          row_start // QBLOCK, n_mask, QBLOCK2, DOUBLE_QUANT)
    absmax = tl.where(n_mask, absmax, 0.0)[:, None]
    even = round_to(tl.load(code_ptr + (byte >> 4)) * absmax, STORED_DTYPE)  # high nibble
    odd = round_to(tl.load(code_ptr + (byte & 0xF)) * absmax, STORED_DTYPE)
    return even, odd


@triton.jit
def round_to(w, DTYPE: tl.constexpr):
    """w (floating) -> DTYPE, round to nearest even: dequantize_4bit's output rounding to the stored
    dtype, and the cast of decoded values to another dtype (torch's ``.to``)."""
    if DTYPE == tl.bfloat16 and INTERPRETED:
        w = round_to_bf16(w.to(tl.float32))  # exact from fp16 / fp32: one rounding, as on the GPU
    else:
        w = w.to(DTYPE)  # bf16: one cvt.rn instruction on the GPU
    return w


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, in integer arithmetic (finite inputs).

    Same bits as the hardware conversion; written out because the Triton interpreter truncates
    instead, and the NF4 decode must be bit-exact everywhere it runs.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr, out_ptr,
    numel,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = decoded weight i for i < numel (flat, contiguous output in the stored dtype)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    w = nf4_decode(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
                   idx, mask, QBLOCK, QBLOCK2, DOUBLE_QUANT, out_ptr.dtype.element_ty)
    tl.store(out_ptr + idx, w, mask=mask)


@triton.jit
def nf4_dequantize_tiles_kernel(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr, out_ptr,
    n_start, n_end, k_start, K, stride_out,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, STORED_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[i, j] = W[n_start + i, k_start + j] (rounded to STORED_DTYPE, then out's dtype) for an
    aligned weight (``nf4_tile_halves``): program (i, j) decodes one [BLOCK_N, BLOCK_K] tile; rows up to
    n_end, columns grid[1] * BLOCK_K from k_start (k_start a multiple of BLOCK_K)."""
    offs_n = n_start + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end
    k0 = k_start + tl.program_id(1) * BLOCK_K
    # Both nibbles of each byte: the byte tile is contiguous along K (coalesced, vectorized loads),
    # the two halves interleaved back in registers (stored contiguously below).
    even, odd = nf4_tile_halves(packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                code_ptr, offs_n.to(tl.int64), n_mask, k0, K, BLOCK_K, QBLOCK, QBLOCK2, DOUBLE_QUANT,
                                STORED_DTYPE)
    w = tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_K])
    rows = (offs_n - n_start).to(tl.int64)
    cols = (k0 - k_start) + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], round_to(w, out_ptr.dtype.element_ty),
             mask=n_mask[:, None])


@triton.jit
def load_weight_tile(w_ptr, n_idx, k_idx, mask, stride_wn, stride_wk, K,
                     absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
                     W_NF4: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, W_STORED_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Tile of the base weight W [N, K] at int64 row indices n_idx and column indices k_idx
    (broadcastable to the tile), in OUT_DTYPE (the dot's operand dtype); 0 where masked.

    Dense: a strided load. NF4 (w_ptr = packed codes): decoded in registers, rounded to the stored
    dtype first, exactly like dequantize_4bit(...).to(x.dtype), so no full-precision copy of W exists.
    """
    if W_NF4:
        w = nf4_decode(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
                       n_idx * K + k_idx, mask, QBLOCK, QBLOCK2, DOUBLE_QUANT, W_STORED_DTYPE)
    else:
        w = tl.load(w_ptr + n_idx * stride_wn + k_idx * stride_wk, mask=mask, other=0.0)
    return round_to(w, OUT_DTYPE) if W_NF4 else w.to(OUT_DTYPE)


# The interpreter converts fp32 -> bf16 by truncation, so the decode rounds in integer arithmetic
# there; compiled kernels use the hardware's round-to-nearest-even conversion (same bits).
INTERPRETED = tl.constexpr(type(nf4_dequantize_kernel).__name__ == "InterpretedFunction")
