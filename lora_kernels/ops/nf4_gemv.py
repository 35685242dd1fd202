"""``lora_kernels::nf4_gemv_lora``: the CUDA C++ NF4 decode GEMV with the LoRA term (``csrc/``).

    nf4_gemv_lora(x [M, K], <NF4 weight tensors>, lora_A [r, K], lora_B [N, r], bias? [N] (combined),
                  scale, blocksize, nested_blocksize, weight_dtype) -> (y [M, N] x.dtype, h [M, r])

For M <= 16 rows of fp16/bf16 x, r <= 64, no dropout. The schema, fake implementation and a CPU
implementation (the PyTorch spec, so ``torch.library.opcheck`` runs without a GPU) are declared
here; the CUDA implementation is registered by the compiled extension ``lora_kernels._C``
(``csrc/bindings.cpp``), loaded lazily by ``load_extension``. A missing or broken extension never
breaks import: CUDA calls then stay on the Triton path.

Dispatch: ``use_cuda_gemv`` sends a forward here when the extension is loaded, the call is
eligible and M <= ``cuda_gemv_max_m()``: by default every M it supports (16), as measured on an
H200 (benchmarks/results/nvidia-h200/: gemv_bfloat16.json against the Triton small-M path's
lora_kernels_nf4 rows of bench_qlora_bfloat16.json): 0.05 vs 1.0 ms at M = 1 and 0.25 vs 1.0 ms at
M = 16 on 4096x14336, 0.13 vs 3.9 ms and 0.90 vs 3.9 ms on 8192x28672. LORA_KERNELS_NF4_GEMV_MAX_M
(read per call) overrides it (0: off).
"""
import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from lora_kernels.ops.checks import env_nonnegative_int
from lora_kernels.ops.reference import torch_lora_forward
from lora_kernels.ops.triton_launch import NF4Tensors

GEMV_MAX_ROWS = 16  # the kernel's row tiles go up to 16
GEMV_MAX_RANK = 64  # h lives in shared memory per block
NF4_GEMV_ENV = "LORA_KERNELS_NF4_GEMV_MAX_M"
DEFAULT_GEMV_MAX_M = GEMV_MAX_ROWS  # measured faster than the Triton path at M = 1, 4, 16 (module docstring)

torch.library.define(
    "lora_kernels::nf4_gemv_lora",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax_code, Tensor? absmax_scale, Tensor? absmax_offset, "
    "Tensor code, Tensor lora_A, Tensor lora_B, Tensor? bias, float scale, int blocksize, int nested_blocksize, "
    "ScalarType weight_dtype) -> (Tensor, Tensor)")


@torch.library.register_fake("lora_kernels::nf4_gemv_lora")
def _nf4_gemv_lora_fake(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, bias,
                        scale, blocksize, nested_blocksize, weight_dtype):
    N, r = lora_B.shape
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], r), dtype=lora_A.dtype)


@torch.library.impl("lora_kernels::nf4_gemv_lora", "cpu")
def _nf4_gemv_lora_cpu(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, bias,
                       scale, blocksize, nested_blocksize, weight_dtype):
    """The spec: the lean PyTorch forward on the same NF4 tensors (no dropout)."""
    N = lora_B.shape[0]
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, x.shape[1], blocksize,
                    nested_blocksize, weight_dtype)
    return torch_lora_forward(x, None, lora_A, lora_B, bias, scale, 0.0, None, wq=wq)


@functools.lru_cache(maxsize=None)
def load_extension() -> bool:
    """Import ``lora_kernels._C`` once (registers the CUDA implementation); False if absent or broken."""
    try:
        import lora_kernels._C  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "lora_kernels._C":  # the extension exists but a dependency does not
            warnings.warn(f"lora_kernels._C failed to load ({exc}); NF4 decoding stays on the Triton path")
        return False
    except Exception as exc:  # a broken build must never break the package
        warnings.warn(f"lora_kernels._C failed to load ({exc!r}); NF4 decoding stays on the Triton path")
        return False
    return True


def cuda_gemv_max_m() -> int:
    """Largest M sent to the CUDA GEMV (env override, else DEFAULT_GEMV_MAX_M; capped at 16)."""
    return min(env_nonnegative_int(NF4_GEMV_ENV, DEFAULT_GEMV_MAX_M), GEMV_MAX_ROWS)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def use_cuda_gemv(x2: Tensor, lora_A: Tensor, dropout_p: float, seed: Optional[Tensor], wq: NF4Tensors) -> bool:
    """Whether this NF4 forward (x2 [M, K], weight ``wq``) runs on the CUDA GEMV instead of the Triton
    kernels. The kernel indexes blocks by shifts: block sizes must be powers of two (bnb's always are)."""
    M = x2.shape[0]
    if x2.device.type != "cuda" or M == 0 or M > cuda_gemv_max_m():
        return False
    if x2.dtype not in (torch.float16, torch.bfloat16) or (dropout_p > 0 and seed is not None):
        return False
    if lora_A.shape[0] > GEMV_MAX_RANK:
        return False
    if not (_power_of_two(wq.blocksize) and (wq.absmax_code is None or _power_of_two(wq.nested_blocksize))):
        return False
    return load_extension()


def cuda_gemv_forward(x2: Tensor, wq: NF4Tensors, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                      scale: float):
    """(y2 [M, N], h [M, r]) from the CUDA GEMV; x2 is made unit-stride along K."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return torch.ops.lora_kernels.nf4_gemv_lora(
        x2, wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale, wq.absmax_offset, wq.code,
        lora_A.contiguous(), lora_B.contiguous(), bias, scale, wq.blocksize, wq.nested_blocksize, wq.dtype)
