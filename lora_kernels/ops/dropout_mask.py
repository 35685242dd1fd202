"""Dropout keep-mask from an 8-byte seed: the PyTorch spec of ``kernels.common.dropout_keep``.

uint32 arithmetic is emulated in int64 tensors; products are split into 16-bit halves so nothing
overflows int64 (signed overflow is undefined in C++, so wrapping is not relied upon).
"""
import torch

from lora_kernels.kernels.common import COL_MULT, DROPOUT_BITS, FMIX_C1, FMIX_C2, ROW_MULT

_MASK32 = 0xFFFFFFFF
_SEED_HIGH = 2**62


def new_dropout_seed(device: torch.device) -> torch.Tensor:
    """Draw a seed from torch's RNG for ``device`` (reproducible under torch.manual_seed): int64 [1]."""
    return torch.randint(0, _SEED_HIGH, (1,), device=device, dtype=torch.int64)


def drop_threshold(p: float) -> int:
    """A value is dropped when the top 24 bits of its hash are below this integer."""
    return int(round(p * (1 << DROPOUT_BITS)))


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for int64 tensors a in [0, 2**32) and a constant c < 2**32."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    c_lo, c_hi = c & 0xFFFF, c >> 16
    cross = ((a_hi * c_lo + a_lo * c_hi) & 0xFFFF) << 16
    return (a_lo * c_lo + cross) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Keep-mask (bool [rows, cols], True = keep) for the row-major flattened [rows, cols] input.

    seed: int64 [1] on the target device. Drop probability is round(p * 2**24) / 2**24.
    """
    device = seed.device
    seed = seed.reshape(1).to(torch.int64)
    lo = seed & _MASK32
    hi = (seed >> 32) & _MASK32
    m = torch.arange(rows, device=device, dtype=torch.int64)
    k = torch.arange(cols, device=device, dtype=torch.int64)
    row_key = _fmix32((_mul32(m, ROW_MULT) + lo) & _MASK32) ^ hi
    bits = _fmix32((row_key[:, None] + _mul32(k, COL_MULT)[None, :]) & _MASK32)
    return (bits >> (32 - DROPOUT_BITS)) >= drop_threshold(p)
