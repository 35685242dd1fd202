"""Pure-PyTorch LoRA linear: the spec (``lora_linear_reference``) and the lean CPU path.

The lean path is what CPU tensors run when the Triton interpreter is off. It has the same
semantics as the kernels and saves nothing itself (the autograd layer decides what is saved).
Everything is 2-D here: x2 [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], y2 [M, N].
"""
from typing import Optional

import torch

from lora_kernels.ops.dropout_mask import dropout_keep_mask


def lora_linear_reference(x, weight, lora_A, lora_B, scale, bias=None, lora_B_bias=None,
                          keep_mask=None, dropout_p=0.0):
    """y = x W^T + bias + scale * (dropout(x) A^T B^T + lora_B_bias), differentiable, any dtype.

    x [..., K]; keep_mask: bool broadcastable to x (True = keep) or None for no dropout.
    """
    x_drop = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    lora = x_drop @ lora_A.t() @ lora_B.t()
    if lora_B_bias is not None:
        lora = lora + lora_B_bias
    y = x @ weight.t() + scale * lora
    if bias is not None:
        y = y + bias
    return y


def _dropped(x2: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    if seed is None:
        return x2
    keep = dropout_keep_mask(seed, x2.shape[0], x2.shape[1], dropout_p)
    return x2 * keep.to(x2.dtype) * (1.0 / (1.0 - dropout_p))


def _merged_weight(weight, lora_A, lora_B, scale: float, seed, rows: int) -> Optional[torch.Tensor]:
    """W + scale * B A [N, K] when the LoRA branch can be folded into the base GEMM, else None.

    Only in fp32 (folding into a 16-bit weight would round the small LoRA delta away), without
    dropout (the LoRA branch then sees the same x), and for rows >= N K / (N + K): the fold costs
    2 N K r flops and an N x K write, the thin rank-r GEMMs it replaces 2 rows r (N + K), so below
    that break-even (e.g. decoding, small batches) the unfolded branch is cheaper. Above it one
    full GEMM beats two thin rank-r GEMMs that each re-read an M x N or M x K operand on CPU BLAS.
    """
    if seed is not None or weight.dtype != torch.float32 or lora_A.dtype != torch.float32:
        return None
    N, K = weight.shape
    if rows * (N + K) < N * K:
        return None
    return torch.addmm(weight, lora_B, lora_A, alpha=scale)


# Rows of an NF4 weight decoded at a time on CPU: the full-precision weight never exists at once.
NF4_CHUNK_ELEMENTS = 1 << 20


def nf4_row_chunks(wq):
    """(n0, n1) row ranges of the NF4 weight wq [N, K], each of at most NF4_CHUNK_ELEMENTS values
    (at least one row): what the CPU path decodes at a time."""
    rows = max(1, NF4_CHUNK_ELEMENTS // max(wq.K, 1))
    for n0 in range(0, wq.N, rows):
        yield n0, min(n0 + rows, wq.N)


def nf4_decode_absmax(wq, b0: int, b1: int) -> torch.Tensor:
    """fp32 scales of blocks [b0, b1): code2[q] * scale2 rounded to fp32, then + offset (no FMA)."""
    if not wq.double_quant:
        return wq.absmax[b0:b1].float()
    blocks = torch.arange(b0, b1, device=wq.absmax.device)
    scaled = (wq.absmax_code.index_select(0, wq.absmax[b0:b1].int())
              * wq.absmax_scale.index_select(0, blocks // wq.nested_blocksize))
    return scaled + wq.absmax_offset


def _nf4_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: the two fp32 NF4 values a packed byte holds (high nibble first), as one 8-byte
    word, so a decode is one 64-bit gather per byte (2x faster on CPU than gathering fp32 pairs)."""
    byte = torch.arange(256, device=code.device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1).view(torch.int64).reshape(256)


def nf4_decode_range(wq, start: int, stop: int) -> torch.Tensor:
    """Flat elements [start, stop) of an NF4 weight in its stored dtype (bit-exact dequantize_4bit).

    Decodes the whole quantization blocks covering the range (block starts are even, so byte
    aligned): one table lookup per byte, one broadcast multiply by the block scales, then the same
    fp32 product and single rounding to the stored dtype as bitsandbytes."""
    bs = wq.blocksize
    k0, k1 = start // bs, (stop - 1) // bs + 1
    lo, hi = k0 * bs, min(k1 * bs, wq.N * wq.K)
    packed = wq.packed.reshape(-1)[lo // 2:(hi + 1) // 2]
    values = _nf4_pair_table(wq.code).index_select(0, packed.int()).view(torch.float32)  # not [idx]: 3x slower
    if values.numel() < (k1 - k0) * bs:  # a partial last block
        values = torch.nn.functional.pad(values, (0, (k1 - k0) * bs - values.numel()))
    scaled = values.view(k1 - k0, bs) * nf4_decode_absmax(wq, k0, k1)[:, None]
    return scaled.view(-1)[start - lo:stop - lo].to(wq.dtype)


def nf4_rows(wq, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [n0, n1) of the NF4 weight as [n1 - n0, K] in ``dtype`` (via the stored dtype, like bnb)."""
    return nf4_decode_range(wq, n0 * wq.K, n1 * wq.K).view(n1 - n0, wq.K).to(dtype)


def _base_forward(x2, weight, wq, bias):
    """x2 W^T + bias [M, N] in x's dtype; W dense [N, K] or NF4 (decoded one row chunk at a time)."""
    if wq is None:
        if bias is not None:
            return torch.addmm(bias.to(x2.dtype), x2, weight.t())
        return torch.mm(x2, weight.t())
    y2 = torch.empty((x2.shape[0], wq.N), dtype=x2.dtype, device=x2.device)
    for n0, n1 in nf4_row_chunks(wq):
        torch.mm(x2, nf4_rows(wq, n0, n1, x2.dtype).t(), out=y2[:, n0:n1])
    if bias is not None:
        y2.add_(bias.to(x2.dtype))
    return y2


def _base_grad_input(grad_y2, weight, wq):
    """dY W [M, K] in dY's dtype; W dense or NF4 (row chunks of W meet column chunks of dY)."""
    if wq is None:
        return torch.mm(grad_y2, weight)
    dx2 = torch.zeros((grad_y2.shape[0], wq.K), dtype=grad_y2.dtype, device=grad_y2.device)
    for n0, n1 in nf4_row_chunks(wq):
        dx2.addmm_(grad_y2[:, n0:n1], nf4_rows(wq, n0, n1, grad_y2.dtype))
    return dx2


def torch_lora_forward(x2, weight, lora_A, lora_B, bias, scale: float, dropout_p: float, seed, wq=None):
    """Returns (y2 [M, N] in x's dtype, h [M, r] in lora_A's dtype). bias is the combined bias.

    weight: dense [N, K], or None with ``wq`` (``triton_launch.NF4Tensors``) for an NF4 weight."""
    h = torch.mm(_dropped(x2, seed, dropout_p).to(lora_A.dtype), lora_A.t())
    merged = _merged_weight(weight, lora_A, lora_B, scale, seed, x2.shape[0]) if wq is None else None
    y2 = _base_forward(x2, merged if merged is not None else weight, wq, bias)
    if merged is None:
        y2 = _add_lora_term(y2, h, lora_B.t(), scale)
    return y2, h


def composite_lora_forward(x2, weight, lora_A, lora_B, bias, scale: float, dropout_p: float, seed):
    """``torch_lora_forward``'s semantics (dense weight) in out-of-place ops only, each with an
    autograd formula and a vmap batching rule (the lean path's in-place addmm_ has none: vmap then
    loops over the batch): what torch.func transforms differentiate. (y2 [M, N], h [M, r])."""
    h = torch.mm(_dropped(x2, seed, dropout_p).to(lora_A.dtype), lora_A.t())
    y2 = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias.to(x2.dtype), x2, weight.t())
    if h.dtype == y2.dtype:
        return torch.addmm(y2, h, lora_B.t().to(h.dtype), alpha=scale), h
    return torch.addmm(y2.to(h.dtype), h, lora_B.t().to(h.dtype), alpha=scale).to(y2.dtype), h


def _add_lora_term(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * left @ right in out's dtype, the product in the adapters' dtype (left's).

    Same dtype: in place, no second buffer. fp32 adapters beside a 16-bit out: the sum is formed in
    fp32 and rounded once (as PEFT adds its fp32 LoRA branch to the base output), not with left and
    right rounded to 16 bits first (that cost up to ~2 ulps of the LoRA term: a 7e-3 relative error
    where it nearly cancels the base term)."""
    if left.dtype == out.dtype:
        return out.addmm_(left, right.to(out.dtype), alpha=scale)
    return torch.addmm(out.to(left.dtype), left, right.to(left.dtype), alpha=scale).to(out.dtype)


def _mm_tn(a: torch.Tensor, b: torch.Tensor, splits: int = 4) -> torch.Tensor:
    """a^T b [p, q] for a [M, p], b [M, q] (a thin: p = r), the M contraction split in ``splits``.

    CPU BLAS runs a thin-output, long-contraction GEMM poorly (one small output tile, a long serial
    k-loop); a batched GEMM over M-chunks plus a sum keeps every thread busy (~20% faster at
    M=2048, r=16). The split is fixed, so the result is deterministic.
    """
    M = a.shape[0]
    # Strided operands would be copied by the reshape: plain mm reads them in place.
    if M < 256 * splits or M % splits or not (a.is_contiguous() and b.is_contiguous()):
        return torch.mm(a.t(), b)
    chunk = M // splits
    return torch.bmm(a.reshape(splits, chunk, a.shape[1]).transpose(1, 2),
                     b.reshape(splits, chunk, b.shape[1])).sum(0)


# Up to this many rows dB is formed as dY^T h directly: the transposed copy of the other form costs
# more than it saves (M = 16: 11 vs 23 us at N = 512; M = 256: equal; M = 512, N = 2048: 434 vs 309 us).
GRAD_B_DIRECT_MAX_M = 256


def _grad_lora_B(h: torch.Tensor, dy: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * dY^T h [N, r], contiguous (as the fake impl); h [M, r], dy [M, N]. In 16 bits the
    scale goes where it cannot overflow: with |scale| <= 1 on h before the product (dY^T h alone can
    overflow where scale * dY^T h does not: a loss scaler's large dY), else on the [N, r] product
    (scale * h can overflow where the product does not: h of a large activation, a small dY).
    (PEFT's autograd scales dY first, which in 16 bits overflows in cases where neither form does.)"""
    scale_first = abs(scale) <= 1.0
    if scale_first:
        h = h * scale
    if h.shape[0] <= GRAD_B_DIRECT_MAX_M:
        d_b = torch.mm(dy.t(), h)
    else:
        # (h^T dY)^T reads dY row-major: faster than dY^T h on CPU BLAS at large M ([N, r] copy is tiny).
        d_b = _mm_tn(h, dy).t().contiguous()
    return d_b if scale_first else d_b.mul_(scale)


def torch_lora_backward(grad_y2, x2, weight, lora_A, lora_B, h, seed, scale: float,
                        dropout_p: float, need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
                        wq=None):
    """Returns (dx2 [M, K], dA [r, K], dB [N, r], dbias [N] fp32) with None for what is not needed,
    from grad_y2 [M, N], x2 [M, K] (or None without need_A), weight [N, K] (None when wq, the NF4
    weight, is given), lora_A [r, K], lora_B [N, r], h [M, r] (or None without need_B) and the
    dropout seed (int64 [1], or None).

    dH = scale * dY B;  dB = scale * dY^T h;  dX = dY W + mask * (dH A) / (1 - p);
    dA = dH^T dropout(x);  dbias = sum_m dY (fp32, the autograd layer casts it).
    The LoRA branch runs in the adapters' dtype (PEFT casts the input to it).
    """
    adapter_dtype = lora_A.dtype
    dy_a = grad_y2.to(adapter_dtype)
    dx2 = d_a = d_b = d_bias = d_h = keep = None
    merged = None
    if need_x and wq is None:
        merged = _merged_weight(weight, lora_A, lora_B, scale, seed, grad_y2.shape[0])
    # Order: every pass over dY runs back to back while dY is still in cache, the M x K dX last.
    if need_A or (need_x and merged is None):
        d_h = torch.mm(dy_a, lora_B * scale)  # scaled first ([N, r]): dY B alone can overflow in 16-bit
    if need_B:
        d_b = _grad_lora_B(h, dy_a, scale)
    if need_bias:
        d_bias = grad_y2.sum(0, dtype=torch.float32)
    if seed is not None and d_h is not None:
        keep = dropout_keep_mask(seed, d_h.shape[0], lora_A.shape[1], dropout_p)
    if need_A:
        x_drop = x2 if keep is None else x2 * keep.to(x2.dtype) * (1.0 / (1.0 - dropout_p))
        d_a = _mm_tn(d_h, x_drop.to(adapter_dtype))
    if merged is not None:
        # dY W + (scale dY B) A = dY (W + scale B A): one GEMM.
        dx2 = torch.mm(grad_y2, merged)
    elif need_x:
        dx2 = _base_grad_input(grad_y2, weight, wq)
        if keep is None:
            dx2 = _add_lora_term(dx2, d_h, lora_A, 1.0)
        else:
            lora_dx = torch.mm(d_h, lora_A)
            lora_dx.mul_(keep.to(lora_dx.dtype)).mul_(1.0 / (1.0 - dropout_p))
            dx2 = dx2.add_(lora_dx) if lora_dx.dtype == dx2.dtype else (dx2 + lora_dx).to(dx2.dtype)
    return dx2, d_a, d_b, d_bias
