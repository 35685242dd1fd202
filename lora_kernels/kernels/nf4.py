"""NF4 decoding on the device: bitsandbytes' 4-bit NormalFloat format, block size QBLOCK.

The weight is flattened row-major; element i has its 4-bit code in byte i // 2 (the even element
in the high nibble) and its scale in block i // QBLOCK. With double quantization the block scale is
itself stored as a uint8 code of bnb's dynamic map:
    absmax_f32[b] = fl(code2[q[b]] * absmax2[b // QBLOCK2]) + offset
and a weight value is fl32(NF4[code] * absmax_f32) rounded once to the stored dtype. This is
bitsandbytes' dequantize_4bit to the bit, provided the multiply and the add are not contracted
into one FMA: every launch of a kernel that decodes NF4 passes enable_fp_fusion=False.

Decoding works on flat element indices, so blocks that span rows (K % QBLOCK != 0) and odd K
need no special case.
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
    block = idx // QBLOCK
    if DOUBLE_QUANT:
        q_absmax = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(absmax_code_ptr + q_absmax, mask=mask, other=0.0) \
            * tl.load(absmax_scale_ptr + block // QBLOCK2, mask=mask, other=0.0)
        absmax = absmax + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    w = value * absmax
    if STORED_DTYPE == tl.bfloat16:
        return round_to_bf16(w)
    return w.to(STORED_DTYPE)


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
    return w.to(OUT_DTYPE)
