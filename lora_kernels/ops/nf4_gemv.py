"""The CUDA C++ ops of ``csrc/``: ``lora_kernels::nf4_gemv_lora``, the NF4 decode GEMV with the LoRA
term; ``lora_kernels::nf4_dequantize_slab``, a slab decode for the large-M route; and
``lora_kernels::nf4_grad_input``, the small-M backward's dX = grad_y @ W + init (end of file).

    nf4_gemv_lora(x [M, K], <NF4 weight tensors>, lora_A [r, K], lora_B [N, r], bias? [N] (combined),
                  scale, blocksize, nested_blocksize, weight_dtype, kernel=0) -> (y [M, N] x.dtype, h [M, r])

For M <= 16 rows of fp16/bf16 x, r <= 64, no dropout. The schema, fake implementation and a CPU
implementation (the PyTorch spec, so ``torch.library.opcheck`` runs without a GPU) are declared
here; the CUDA implementation is registered by the compiled extension ``lora_kernels._C``
(``csrc/bindings.cpp``), loaded lazily by ``load_extension``. A missing or broken extension never
breaks import: CUDA calls then stay on the Triton path.

Two CUDA kernels (``kernel`` argument; csrc/nf4_gemv_kernels.cuh explains both):
    0 ``simt``  any K and block size; each weight decoded bit-exactly as ``dequantize_4bit`` does.
    1 ``mma``   tensor cores (mma.sync) and a cp.async pipeline; K % 256 == 0, block size 64, sm_80+
                with >= 161 KiB of shared memory per block (A100 / H100 / H200), 16-byte aligned
                absmax. Weights are never formed: block sums of NF4 codes (in x's dtype) times x are
                scaled by the block scale, so results equal the bit-exact decode up to the rounding of
                each weight (as bitsandbytes' own GEMV, which also rounds differently). Not run on a
                GPU yet: opt in with LORA_KERNELS_NF4_GEMV_KERNEL=mma until measured.
``gemv_kernel`` picks per call: the requested kernel (LORA_KERNELS_NF4_GEMV_KERNEL, default
``simt``) when the call is eligible for it, else ``simt``.

Dispatch: ``use_cuda_gemv`` sends a forward here when the extension is loaded, the call is
eligible and M <= ``cuda_gemv_max_m()``: by default up to 32 rows (two launches of 16), as measured
on an H200 (benchmarks/results/nvidia-h200/: gemv_bfloat16.json against the other paths' rows of
bench_qlora_bfloat16.json): 0.05 vs 1.0 ms at M = 1 and 0.25 vs 1.0 ms at M = 16 on 4096x14336, 0.13
vs 3.9 ms and 0.90 vs 3.9 ms on 8192x28672 (the SIMT kernel against the Triton small-M path); at M =
32 two launches take 2 x 0.25 and 2 x 0.90 ms, against 0.95 / 0.69 ms (fused GEMM / slabs + cuBLAS,
inference forward) on 4096x14336 and 3.9 / 2.2 ms on 8192x28672. At M = 64, four launches (~1.0 and
~3.6 ms) lose to the slab path (0.73-0.77 and 2.1 ms), which takes M >= 64 (configs.NF4_CUBLAS_MIN_M).
LORA_KERNELS_NF4_GEMV_MAX_M (read per call) overrides it (0: off; up to 64, 16 rows per launch: each
launch streams the weight again, which the tensor-core kernel may afford further; not measured yet).
"""
import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from lora_kernels.ops.bnb_dequantize import bnb_rows_quant_type
from lora_kernels.ops.checks import env_nonnegative_int, env_text, takes_cuda_routes
from lora_kernels.ops.nf4 import NF4Tensors
from lora_kernels.ops.reference import nf4_rows, torch_lora_forward

GEMV_MAX_ROWS = 16  # rows per launch: the kernels' row tiles go up to 16
GEMV_CHUNKED_MAX_M = 64  # larger M runs one launch per 16 rows (each streams the weight again)
GEMV_MAX_RANK = 64  # h lives in shared memory per block
NF4_GEMV_ENV = "LORA_KERNELS_NF4_GEMV_MAX_M"
DEFAULT_GEMV_MAX_M = 2 * GEMV_MAX_ROWS  # measured faster than the other paths up to M = 32 (module docstring)
GEMV_KERNELS = ("simt", "mma")  # the op's `kernel` argument is the index
NF4_GEMV_KERNEL_ENV = "LORA_KERNELS_NF4_GEMV_KERNEL"
DEFAULT_GEMV_KERNEL = "simt"  # the measured one; "mma" has not run on a GPU yet (module docstring)
# Shared memory per block the tensor-core kernel needs (mma_smem_bytes(2) in csrc/nf4_gemv_mma_kernel.cuh:
# the code-pair table, reduction, h, a tile's B rows and bias, absmax table and two ring stages for
# each of its 16 warps; the kernel checks it too).
MMA_SHARED_BYTES = 164928
MMA_K_MULTIPLE = 256  # one pass: 4 quantization blocks of a row

torch.library.define(
    "lora_kernels::nf4_gemv_lora",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax_code, Tensor? absmax_scale, Tensor? absmax_offset, "
    "Tensor code, Tensor lora_A, Tensor lora_B, Tensor? bias, float scale, int blocksize, int nested_blocksize, "
    "ScalarType weight_dtype, int kernel=0) -> (Tensor, Tensor)")


@torch.library.register_fake("lora_kernels::nf4_gemv_lora")
def _nf4_gemv_lora_fake(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, bias,
                        scale, blocksize, nested_blocksize, weight_dtype, kernel=0):
    N, r = lora_B.shape
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], r), dtype=lora_A.dtype)


@torch.library.impl("lora_kernels::nf4_gemv_lora", "cpu")
def _nf4_gemv_lora_cpu(x, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, lora_A, lora_B, bias,
                       scale, blocksize, nested_blocksize, weight_dtype, kernel=0):
    """The spec: the lean PyTorch forward on the same NF4 tensors (no dropout; both kernels)."""
    if kernel not in (0, 1):
        raise ValueError(f"kernel must be 0 ({GEMV_KERNELS[0]}) or 1 ({GEMV_KERNELS[1]}), got {kernel!r}")
    N = lora_B.shape[0]
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, x.shape[1], blocksize,
                    nested_blocksize, weight_dtype)
    return torch_lora_forward(x, None, lora_A, lora_B, bias, scale, 0.0, None, wq=wq)


# The slab decode of the large-M route (ops.triton_launch._nf4_dequantize_slab) on CUDA: W[n0:n1, k0:k1]
# decoded bit-exactly (rounded to the stored dtype, then to out_dtype) into a new contiguous tensor.
torch.library.define(
    "lora_kernels::nf4_dequantize_slab",
    "(Tensor packed, Tensor absmax, Tensor? absmax_code, Tensor? absmax_scale, Tensor? absmax_offset, Tensor code, "
    "int N, int K, int n0, int n1, int k0, int k1, int blocksize, int nested_blocksize, ScalarType weight_dtype, "
    "ScalarType out_dtype) -> Tensor")


@torch.library.register_fake("lora_kernels::nf4_dequantize_slab")
def _nf4_dequantize_slab_fake(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, n0, n1, k0, k1,
                              blocksize, nested_blocksize, weight_dtype, out_dtype):
    return packed.new_empty((n1 - n0, k1 - k0), dtype=out_dtype)


@torch.library.impl("lora_kernels::nf4_dequantize_slab", "cpu")
def _nf4_dequantize_slab_cpu(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, n0, n1, k0, k1,
                             blocksize, nested_blocksize, weight_dtype, out_dtype):
    """The spec: the CPU path's row decode (bit-exact with dequantize_4bit), then the columns."""
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K, blocksize, nested_blocksize,
                    weight_dtype)
    return nf4_rows(wq, n0, n1, out_dtype)[:, k0:k1].contiguous()


# Which kernel decodes the large-M route's slabs: auto (default): bitsandbytes' on CUDA where it can
# decode the slab (whole rows: the forward's; ops.bnb_dequantize says why), else the Triton tiles;
# bnb: bitsandbytes' where it can on any device (the CPU tests run it); cuda: the kernel of csrc/
# where it can; triton: the Triton tiles always. None of the three has been timed in this route on a
# GPU since the Triton tile decode was rewritten: the QLoRA bench's rows lora_kernels_nf4_cublas,
# lora_kernels_nf4_cublas_triton and lora_kernels_nf4_cublas_cuda compare them.
NF4_SLAB_DECODER_ENV = "LORA_KERNELS_NF4_SLAB_DECODER"
SLAB_DECODERS = ("auto", "triton", "cuda", "bnb")


def slab_decoder_choice() -> str:
    """LORA_KERNELS_NF4_SLAB_DECODER (read per call), checked; ``auto`` when unset."""
    choice = env_text(NF4_SLAB_DECODER_ENV).strip() or SLAB_DECODERS[0]
    if choice not in SLAB_DECODERS:
        raise ValueError(f"{NF4_SLAB_DECODER_ENV} must be one of {', '.join(SLAB_DECODERS)}, got {choice!r}")
    return choice


def use_cuda_slab_decode(wq: NF4Tensors, k_start: int, k_end: int) -> bool:
    """Whether the slab W[:, k_start:k_end] of ``wq`` (on CUDA) is decoded by the CUDA kernel: asked for
    (LORA_KERNELS_NF4_SLAB_DECODER=cuda), the extension built for its GPU, and a slab it takes
    (K, k_start and the width multiples of 8; power-of-two block sizes >= 8; 4-byte aligned codes)."""
    if slab_decoder_choice() != "cuda" or wq.packed.device.type != "cuda" or k_start % 8 or (k_end - k_start) % 8:
        return False
    return decodes_by_words(wq) and extension_runs_on(wq.packed.device)


def bnb_slab_quant_type(wq: NF4Tensors, n_start: int, k_start: int, k_end: int) -> Optional[str]:
    """The quant type to hand bitsandbytes' kernel when it decodes the slab W[n_start:, k_start:k_end]
    of ``wq`` (``bnb_dequantize.bnb_dequantize_rows``), or None: LORA_KERNELS_NF4_SLAB_DECODER auto (on
    CUDA) or bnb, and a slab it can decode (``bnb_dequantize.bnb_rows_quant_type``: whole rows from a
    block boundary; bitsandbytes imported; the weight's table known)."""
    choice = slab_decoder_choice()
    if choice == "bnb" or (choice == "auto" and takes_cuda_routes(wq.packed.device)):
        return bnb_rows_quant_type(wq, n_start, k_start, k_end)
    return None


def decodes_by_words(wq: NF4Tensors) -> bool:
    """What the kernels that decode one 32-bit word of codes (8 values, in one quantization block) per
    thread and step need of the weight (slab decode, small-M dX): K % 8 == 0, power-of-two block
    sizes >= 8 (indices by shifts) and 4-byte aligned codes."""
    if wq.K % 8 or wq.blocksize < 8 or not _power_of_two(wq.blocksize):
        return False
    if wq.absmax_code is not None and not _power_of_two(wq.nested_blocksize):
        return False
    return wq.packed.data_ptr() % 4 == 0


def cuda_dequantize_slab(wq: NF4Tensors, n_start: int, n_end: int, k_start: int, k_end: int,
                         dtype: torch.dtype) -> Tensor:
    """W[n_start:n_end, k_start:k_end] [n_end - n_start, k_end - k_start] in ``dtype`` by the CUDA
    kernel (``use_cuda_slab_decode`` first)."""
    return torch.ops.lora_kernels.nf4_dequantize_slab(
        wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale, wq.absmax_offset, wq.code, wq.N, wq.K,
        n_start, n_end, k_start, k_end, wq.blocksize, wq.nested_blocksize, wq.dtype, dtype)


# The QLoRA backward's base product at small M on CUDA (csrc/nf4_grad_input_kernels.cuh): dx = grad_y @
# W (W decoded bit-exactly, rounded to the stored dtype then grad_y's) + init (the LoRA term in fp32),
# rounded once to grad_y's dtype. The Triton dX kernel has too few programs there (one per 64
# columns of W, each walking all N rows).
torch.library.define(
    "lora_kernels::nf4_grad_input",
    "(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? absmax_code, Tensor? absmax_scale, Tensor? absmax_offset, "
    "Tensor code, Tensor? init, int K, int blocksize, int nested_blocksize, ScalarType weight_dtype) -> Tensor")


@torch.library.register_fake("lora_kernels::nf4_grad_input")
def _nf4_grad_input_fake(grad_y, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, init, K, blocksize,
                         nested_blocksize, weight_dtype):
    return grad_y.new_empty((grad_y.shape[0], K))


@torch.library.impl("lora_kernels::nf4_grad_input", "cpu")
def _nf4_grad_input_cpu(grad_y, packed, absmax, absmax_code, absmax_scale, absmax_offset, code, init, K, blocksize,
                        nested_blocksize, weight_dtype):
    """The spec: fp32 products of grad_y and the decoded weight in grad_y's dtype, plus init, rounded once."""
    wq = NF4Tensors(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, grad_y.shape[1], K, blocksize,
                    nested_blocksize, weight_dtype)
    dx = grad_y.float() @ nf4_rows(wq, 0, wq.N, grad_y.dtype).float()
    return (dx + init if init is not None else dx).to(grad_y.dtype)


NF4_GRAD_INPUT_ENV = "LORA_KERNELS_NF4_GRAD_INPUT_MAX_M"
DEFAULT_GRAD_INPUT_MAX_M = 0  # off: not run on a GPU yet (bench row lora_kernels_nf4_cuda_dx)


def cuda_grad_input_max_m() -> int:
    """Largest M whose NF4 backward dX runs on the CUDA kernel (env override, else
    DEFAULT_GRAD_INPUT_MAX_M; at most GEMV_CHUNKED_MAX_M: the kernel takes up to 64 rows)."""
    return min(env_nonnegative_int(NF4_GRAD_INPUT_ENV, DEFAULT_GRAD_INPUT_MAX_M), GEMV_CHUNKED_MAX_M)


def use_cuda_grad_input(grad_y2: Tensor, wq: NF4Tensors) -> bool:
    """Whether the NF4 backward dX = grad_y2 @ W (+ the LoRA term) runs on the CUDA kernel: a CUDA call
    the kernel takes (``grad_input_eligible``), the extension built for its GPU (``extension_runs_on``)."""
    return grad_y2.device.type == "cuda" and grad_input_eligible(grad_y2, wq) and extension_runs_on(grad_y2.device)


def grad_input_eligible(grad_y2: Tensor, wq: NF4Tensors) -> bool:
    """1 <= M <= cuda_grad_input_max_m(), unit stride along N, and a weight the kernel decodes a 32-bit
    word of codes at a time (``decodes_by_words``: a lane's 8 columns)."""
    M = grad_y2.shape[0]
    return 1 <= M <= cuda_grad_input_max_m() and grad_y2.stride(1) == 1 and decodes_by_words(wq)


def cuda_grad_input(grad_y2: Tensor, wq: NF4Tensors, init: Optional[Tensor]) -> Tensor:
    """dx [M, K] in grad_y2's dtype = grad_y2 [M, N] @ W + init (fp32 [M, K] or None), by the CUDA
    kernel (``use_cuda_grad_input`` first)."""
    return torch.ops.lora_kernels.nf4_grad_input(
        grad_y2, wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale, wq.absmax_offset, wq.code, init, wq.K,
        wq.blocksize, wq.nested_blocksize, wq.dtype)


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


def parse_cuda_archs(text: str) -> tuple:
    """``lora_kernels._C.cuda_archs`` ("80_90", "90a_100") as ((major, minor, suffix), ...)."""
    archs = []
    for item in text.split("_"):
        digits = item.rstrip("af")
        if len(digits) < 2 or not digits.isdigit():
            raise ValueError(f"cuda_archs: cannot parse {item!r} in {text!r}")
        archs.append((int(digits[:-1]), int(digits[-1]), item[len(digits):]))
    return tuple(archs)


def built_for(archs: tuple, capability: tuple) -> bool:
    """Whether kernels built as SASS for ``archs`` (``parse_cuda_archs``) run on a GPU of compute
    ``capability`` (major, minor): SASS runs on its own major version at the same or a higher minor;
    an arch-specific target ("90a") only on exactly its GPU. No PTX is built, so never on another major."""
    major, minor = capability
    return any(a_major == major and (a_minor == minor if suffix == "a" else a_minor <= minor)
               for a_major, a_minor, suffix in archs)


@functools.lru_cache(maxsize=None)
def _extension_runs_on(device_index: int) -> bool:
    if not load_extension():
        return False
    import lora_kernels._C as ext

    try:
        archs = parse_cuda_archs(getattr(ext, "cuda_archs"))
    except (AttributeError, ValueError) as exc:
        warnings.warn(f"lora_kernels._C does not say which GPUs it was built for ({exc}); "
                      "NF4 decoding stays on the Triton path")
        return False
    capability = torch.cuda.get_device_capability(device_index)
    if not built_for(archs, capability):
        warnings.warn(f"lora_kernels._C was built for sm_{', sm_'.join(ext.cuda_archs.split('_'))}, not for this "
                      f"GPU (sm_{capability[0]}{capability[1]}): NF4 decoding stays on the Triton path (rebuild "
                      f"with LORA_KERNELS_CUDA_ARCHS={capability[0]}{capability[1]})")
        return False
    return True


def extension_runs_on(device: torch.device) -> bool:
    """Whether the CUDA kernels of ``lora_kernels._C`` can run on ``device`` (a CUDA device): loaded,
    and built for its architecture (else a warning, once per device, and the Triton path)."""
    return _extension_runs_on(device.index if device.index is not None else torch.cuda.current_device())


def cuda_gemv_max_m() -> int:
    """Largest M sent to the CUDA GEMV (env override, else DEFAULT_GEMV_MAX_M; capped at
    GEMV_CHUNKED_MAX_M: above 16 rows, one launch per 16)."""
    return min(env_nonnegative_int(NF4_GEMV_ENV, DEFAULT_GEMV_MAX_M), GEMV_CHUNKED_MAX_M)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def use_cuda_gemv(x2: Tensor, lora_A: Tensor, dropout_p: float, seed: Optional[Tensor], wq: NF4Tensors) -> bool:
    """Whether this NF4 forward (x2 [M, K], weight ``wq``) runs on the CUDA GEMV instead of the Triton
    kernels: a CUDA call the GEMV takes (``gemv_eligible``), the extension built for its GPU
    (``extension_runs_on``)."""
    return (x2.device.type == "cuda" and gemv_eligible(x2, lora_A, dropout_p, seed, wq)
            and extension_runs_on(x2.device))


def gemv_eligible(x2: Tensor, lora_A: Tensor, dropout_p: float, seed: Optional[Tensor], wq: NF4Tensors) -> bool:
    """1 <= M <= cuda_gemv_max_m(), fp16/bf16 x, no dropout, r <= GEMV_MAX_RANK, power-of-two block
    sizes (the kernels index blocks by shifts; bitsandbytes' always are), of at least 32 (a warp's
    32 values per step lie in one block)."""
    M = x2.shape[0]
    if M == 0 or M > cuda_gemv_max_m():
        return False
    if x2.dtype not in (torch.float16, torch.bfloat16) or (dropout_p > 0 and seed is not None):
        return False
    if lora_A.shape[0] > GEMV_MAX_RANK:
        return False
    return (wq.blocksize >= 32 and _power_of_two(wq.blocksize)
            and (wq.absmax_code is None or _power_of_two(wq.nested_blocksize)))


def requested_gemv_kernel() -> str:
    """The kernel LORA_KERNELS_NF4_GEMV_KERNEL asks for (read per call), DEFAULT_GEMV_KERNEL if unset."""
    name = env_text(NF4_GEMV_KERNEL_ENV).strip() or DEFAULT_GEMV_KERNEL
    if name not in GEMV_KERNELS:
        raise ValueError(f"{NF4_GEMV_KERNEL_ENV} must be one of {', '.join(GEMV_KERNELS)}, got {name!r}")
    return name


def mma_eligible(x2: Tensor, wq: NF4Tensors) -> bool:
    """Whether the tensor-core kernel takes this call (module docstring). x2 needs no alignment: a
    misaligned x2 is copied (M <= 16 rows) by ``cuda_gemv_forward``."""
    return mma_weight_ok(wq) and mma_device_ok(x2.device)


def mma_weight_ok(wq: NF4Tensors) -> bool:
    """The weight's part of the tensor-core kernel's rule: K % 256 == 0, block size 64, a nested block
    size of at least 4 (a pass's 4 blocks share one second-level scale), 8-byte aligned codes,
    16-byte aligned absmax, fewer than 2**31 blocks."""
    if wq.K % MMA_K_MULTIPLE or wq.blocksize != 64:
        return False
    if wq.absmax_code is not None and (wq.nested_blocksize < 4 or not _power_of_two(wq.nested_blocksize)):
        return False
    return wq.packed.data_ptr() % 8 == 0 and wq.absmax.data_ptr() % 16 == 0 and wq.N * wq.K // 64 < 2 ** 31


def mma_device_ok(device: torch.device) -> bool:
    """Whether ``device`` can run the tensor-core kernel: sm_80+ with MMA_SHARED_BYTES of shared
    memory per block."""
    props = _device_properties(device)
    return props.major >= 8 and getattr(props, "shared_memory_per_block_optin", 0) >= MMA_SHARED_BYTES


def _device_properties(device: torch.device):
    return torch.cuda.get_device_properties(device)  # cached by torch; queried per call, never at import


def gemv_kernel(x2: Tensor, wq: NF4Tensors, kernel: Optional[str] = None) -> str:
    """The kernel this call runs: ``kernel`` (default: the requested one) when eligible, else simt."""
    kernel = requested_gemv_kernel() if kernel is None else kernel
    if kernel not in GEMV_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(GEMV_KERNELS)}, got {kernel!r}")
    return "mma" if kernel == "mma" and mma_eligible(x2, wq) else "simt"


def cuda_gemv_forward(x2: Tensor, wq: NF4Tensors, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                      scale: float, kernel: Optional[str] = None):
    """(y2 [M, N], h [M, r]) from the CUDA GEMV; x2 is made unit-stride along K (and, for the
    tensor-core kernel, 16-byte aligned rows). ``kernel``: as ``gemv_kernel``."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:  # one launch per 16 rows: each streams the weight, so M / 16 times the bytes
        parts = [cuda_gemv_forward(x2[m0:m0 + GEMV_MAX_ROWS], wq, lora_A, lora_B, bias, scale, kernel)
                 for m0 in range(0, M, GEMV_MAX_ROWS)]
        return torch.cat([y for y, _ in parts]), torch.cat([h for _, h in parts])
    chosen = gemv_kernel(x2, wq, kernel)
    if chosen == "mma" and (x2.data_ptr() % 16 or x2.stride(0) % 8):
        x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh, aligned copy of <= 16 rows
    return torch.ops.lora_kernels.nf4_gemv_lora(
        x2, wq.packed, wq.absmax, wq.absmax_code, wq.absmax_scale, wq.absmax_offset, wq.code,
        lora_A.contiguous(), lora_B.contiguous(), bias, scale, wq.blocksize, wq.nested_blocksize, wq.dtype,
        GEMV_KERNELS.index(chosen))
