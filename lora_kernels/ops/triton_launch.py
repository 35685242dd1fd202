"""Launchers for the Triton LoRA kernels: allocate outputs and workspaces, pick the tile config,
compute grids, reduce split partials. Arguments are assumed checked (``ops.checks``), 2-D and
non-empty; strides are passed through, so x and dY need not be contiguous.
"""
import contextlib
import functools
from typing import Optional

import torch
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lora_kernels.kernels import configs
from lora_kernels.kernels.lora_backward import (lora_grad_a_kernel, lora_grad_input_kernel,
                                                lora_grad_input_tma_kernel, lora_grad_out_pass_kernel)
from lora_kernels.kernels.lora_forward import (lora_forward_fused_kernel, lora_forward_gemm_kernel,
                                               lora_forward_gemm_tma_kernel, lora_shrink_kernel)
from lora_kernels.kernels.nf4 import nf4_dequantize_kernel, nf4_dequantize_tiles_kernel
from lora_kernels.ops import nf4_gemv
from lora_kernels.ops.bnb_dequantize import bnb_dequantize_rows, with_decoded_scales
from lora_kernels.ops.checks import env_nonnegative_int
from lora_kernels.ops.dropout_mask import drop_threshold
from lora_kernels.ops.launch import launch
from lora_kernels.ops.nf4 import NF4Tensors


def launch_with_fma_option(kernel, grid: tuple, *args, **kwargs) -> None:
    """``ops.launch.launch`` with FMA contraction stated, never left to Triton's default: on
    (``enable_fp_fusion=True``) unless the caller passes it (the NF4 decode turns it off). Triton 3.9
    warns when the option is left unset, and 3.10 turns its default off, which would change the
    dense kernels' epilogue rounding and speed with the Triton version."""
    if "enable_fp_fusion" not in kwargs:
        kwargs["enable_fp_fusion"] = True
    launch(kernel, grid, *args, **kwargs)


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints. triton.cdiv is a ConstexprFunction (a few µs per host call: it
    unwraps constexprs), and a launch computes several grids: this is per-call host overhead."""
    return -(-a // b)


def nf4_aligned(wq: NF4Tensors, block_k: int) -> bool:
    """Whether GEMM tiles BLOCK_K wide along K (starting at multiples of it) each lie inside one
    quantization block per row, so the kernels take the fast decode (``kernels.nf4.nf4_tile_halves``): no
    block spans two rows (K % blocksize == 0) and blocksize % block_k == 0. Llama-style shapes with
    bnb's 64-blocks are; other shapes decode per element."""
    return wq.K % wq.blocksize == 0 and wq.blocksize % block_k == 0


def _gemm_config(config_fn, wq: Optional[NF4Tensors], *args, **kwargs) -> configs.TileConfig:
    """``config_fn(*args, weight_format, **kwargs)`` for the base weight: dense, or NF4 in the
    configuration of aligned weights when ``wq`` is aligned for its tiles, else the per-element
    decode's (``configs._nf4_gemm_config``)."""
    if wq is None:
        return config_fn(*args, "dense", **kwargs)
    cfg = config_fn(*args, "nf4", **kwargs)
    if nf4_aligned(wq, cfg.blocks["BLOCK_K"]):
        return cfg
    return config_fn(*args, "nf4", nf4_aligned=False, **kwargs)


def _weight_args(wq: Optional[NF4Tensors], block_k: int = 0):
    """(extra pointer args, constexprs, launch options) describing the base weight to the GEMMs whose
    tiles are block_k wide along K.

    NF4 decoding must not fuse multiply and add into an FMA (bit-exact absmax decode), hence
    enable_fp_fusion=False; dense weights keep ``launch``'s (on).
    """
    if wq is None:
        return (None,) * 5, {"W_NF4": False, "QBLOCK": 64, "QBLOCK2": 256, "DOUBLE_QUANT": False,
                             "W_STORED_DTYPE": tl.float32, "NF4_ALIGNED": False}, {}
    dq = wq.double_quant
    ptrs = (wq.absmax, wq.absmax_code if dq else None, wq.absmax_scale if dq else None,
            wq.absmax_offset if dq else None, wq.code)
    return ptrs, {"W_NF4": True, "QBLOCK": wq.blocksize, "QBLOCK2": wq.nested_blocksize,
                  "DOUBLE_QUANT": dq, "W_STORED_DTYPE": TL_DTYPES[wq.dtype],
                  "NF4_ALIGNED": block_k > 0 and nf4_aligned(wq, block_k)}, {"enable_fp_fusion": False}


def on_device(device: torch.device):
    """Context in which Triton launches reach ``device``. A Triton launch runs on the *current* CUDA
    device and its current stream, whatever device its tensors are on; a model spread over several
    GPUs (e.g. device_map="auto") calls layers on other devices from the same thread."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launches_on(device_of):
    """Decorator: run the launcher inside ``on_device(device_of(first argument))``."""
    def wrap(launcher):
        @functools.wraps(launcher)
        def launch_on_device(first, *args, **kwargs):
            with on_device(device_of(first)):
                return launcher(first, *args, **kwargs)
        return launch_on_device
    return wrap


@_launches_on(lambda wq: wq.packed.device)
def triton_nf4_dequantize(wq: NF4Tensors, numel: int) -> torch.Tensor:
    """Flat [numel] tensor in wq.dtype, equal bit for bit to bitsandbytes' dequantize_4bit.

    When numel is a multiple of the block size (nearly every weight), the flat weight is read as
    rows of one quantization block each, an aligned [numel / blocksize, blocksize] weight, and takes
    the slabs' decoder (``_nf4_dequantize_slab``: by default bitsandbytes' own kernel on CUDA where it
    can, else the Triton tiles); otherwise the per-element Triton decode."""
    bs = wq.blocksize
    if numel > 0 and numel % bs == 0 and bs % nf4_slab_block_k(wq) == 0:
        rows = wq._replace(N=numel // bs, K=bs)
        return _nf4_dequantize_slab(rows, 0, rows.N, 0, bs, wq.dtype).reshape(numel)
    out = torch.empty(numel, dtype=wq.dtype, device=wq.packed.device)
    if numel == 0:
        return out
    ptrs, consts, opts = _weight_args(wq)
    cfg = configs.nf4_dequantize_config()
    launch_with_fma_option(nf4_dequantize_kernel, (cdiv(numel, cfg.blocks["BLOCK"]),),
        wq.packed, *ptrs, out, numel,
        QBLOCK=consts["QBLOCK"], QBLOCK2=consts["QBLOCK2"], DOUBLE_QUANT=consts["DOUBLE_QUANT"], **cfg.blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **opts)
    return out


def _nf4_dequantize_slab(wq: NF4Tensors, n_start: int, n_end: int, k_start: int, k_end: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """W[n_start:n_end, k_start:k_end] as a contiguous [n_end - n_start, k_end - k_start] tensor in
    ``dtype`` (each value rounded to wq.dtype first, as dequantize_4bit(...).to(dtype)). Needs an
    aligned weight (``nf4_aligned(wq, nf4_slab_block_k(wq))``) and k_start, k_end multiples of
    ``nf4_slab_block_k(wq)`` (or k_end = K). LORA_KERNELS_NF4_SLAB_DECODER picks the kernel
    (``ops.nf4_gemv``): by default bitsandbytes' own on CUDA where it can decode the slab (whole rows:
    the forward's slabs; ``ops.bnb_dequantize``), else the Triton tiles; ``cuda``: the kernel of
    csrc/ where it can."""
    quant_type = nf4_gemv.bnb_slab_quant_type(wq, n_start, k_start, k_end)
    if quant_type is not None:
        return bnb_dequantize_rows(wq, n_start, n_end, quant_type, dtype)
    if wq.packed.device.type == "cuda" and nf4_gemv.use_cuda_slab_decode(wq, k_start, k_end):
        return nf4_gemv.cuda_dequantize_slab(wq, n_start, n_end, k_start, k_end, dtype)
    cfg = configs.nf4_dequantize_tiles_config(wq.blocksize)
    block_n, block_k = cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_K"]
    out = torch.empty((n_end - n_start, k_end - k_start), dtype=dtype, device=wq.packed.device)
    if out.numel() == 0:
        return out
    ptrs, consts, opts = _weight_args(wq)
    launch_with_fma_option(nf4_dequantize_tiles_kernel, (cdiv(n_end - n_start, block_n), (k_end - k_start) // block_k),
        wq.packed, *ptrs, out, n_start, n_end, k_start, wq.K, out.stride(0),
        QBLOCK=wq.blocksize, QBLOCK2=wq.nested_blocksize, DOUBLE_QUANT=wq.double_quant,
        STORED_DTYPE=TL_DTYPES[wq.dtype], **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **opts)
    return out


triton_nf4_dequantize_slab = _launches_on(lambda wq: wq.packed.device)(_nf4_dequantize_slab)


def nf4_slab_block_k(wq: NF4Tensors) -> int:
    """K extent of the slab decode's tiles (``configs.nf4_dequantize_tiles_config``)."""
    return configs.nf4_dequantize_tiles_config(wq.blocksize).blocks["BLOCK_K"]


# Overrides configs.NF4_CUBLAS_MIN_M (read per call): 0 disables the slab-decode + cuBLAS path.
NF4_CUBLAS_MIN_M_ENV = "LORA_KERNELS_NF4_CUBLAS_MIN_M"


def use_nf4_cublas(M: int, wq: Optional[NF4Tensors]) -> bool:
    """Whether an NF4 forward / dX over M rows runs the base product on cuBLAS over slabs of the decoded
    weight (configs.NF4_CUBLAS_MIN_M): switched on for M, and an aligned weight."""
    min_m = env_nonnegative_int(NF4_CUBLAS_MIN_M_ENV, configs.NF4_CUBLAS_MIN_M)
    return wq is not None and 0 < min_m <= M and nf4_aligned(wq, nf4_slab_block_k(wq))


# Overrides configs.DENSE_CUBLAS_MIN_M (read per call): the cuBLAS base route for dense weights.
DENSE_CUBLAS_MIN_M_ENV = "LORA_KERNELS_DENSE_CUBLAS_MIN_M"


def use_cublas_base(M: int, wq: Optional[NF4Tensors]) -> bool:
    """Whether a forward / dX over M rows runs its base product on cuBLAS, the LoRA term and bias in
    the GEMM kernels' epilogues: NF4 weights by ``use_nf4_cublas`` (slabs of the decoded weight), dense
    ones from configs.DENSE_CUBLAS_MIN_M rows (LORA_KERNELS_DENSE_CUBLAS_MIN_M; 0: off)."""
    if wq is not None:
        return use_nf4_cublas(M, wq)
    min_m = env_nonnegative_int(DENSE_CUBLAS_MIN_M_ENV, configs.DENSE_CUBLAS_MIN_M)
    return 0 < min_m <= M


def _slab_extent(other: int, length: int, element_size: int, step: int) -> int:
    """Rows (or columns) of a slab of a [length, other] (or [other, length]) weight: what fits
    configs.NF4_SLAB_BYTES, in multiples of ``step``, at least one step, and at most half the
    weight (rounded up to a step) so that no slab is the whole decoded weight (when length > step)."""
    fit = configs.NF4_SLAB_BYTES // max(1, other * element_size) // step * step
    half = cdiv(cdiv(length, 2), step) * step
    return min(length, max(step, min(fit, half)))


def is_interpreted() -> bool:
    """True when triton.jit produced interpreter functions (TRITON_INTERPRET=1 at import)."""
    return type(lora_shrink_kernel).__name__ == "InterpretedFunction"  # any of our kernels


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to aim for in split-M kernels: two waves on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 2 * _num_sms(index)
    return 4


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    return configs.arch_family(torch.cuda.get_device_capability(device_index))


def _device_arch(device: torch.device) -> int:
    """Config family of the device (the interpreter uses the sm_90 table)."""
    if device.type == "cuda":
        return _arch(device.index if device.index is not None else torch.cuda.current_device())
    return 90


def _fp32_precision() -> str:
    # Follow torch's own fp32 matmul setting so results match what users get from F.linear.
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _dot_flags(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    """Dot precision of the base dots (x's dtype) and LoRA dots (the adapters' dtype).

    fp32 adapters beside 16-bit x use tf32 dots: finer than the 16-bit output rounding, and fast.
    """
    base = _fp32_precision() if x_dtype == torch.float32 else "tf32"  # ignored for 16-bit operands
    lora = base if x_dtype == torch.float32 or adapter_dtype != torch.float32 else "tf32"
    upcast = is_interpreted() and torch.bfloat16 in (x_dtype, adapter_dtype)
    return {"DOT_PRECISION": base, "LORA_PRECISION": lora, "UPCAST_DOT": upcast}


def _config_key(x_dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device):
    """(kind, arch) arguments of the configs.*_config functions."""
    kind = configs.dot_kind(x_dtype == torch.float32, adapter_dtype == torch.float32, _fp32_precision())
    return kind, _device_arch(device)


# Overrides configs.SMALL_M_MAX (read per call): for tuning the threshold on a new GPU, e.g. with
# ``python -m lora_kernels split-k``. 0 disables split-K; a huge value forces it.
SMALL_M_ENV = "LORA_KERNELS_SMALL_M_MAX"


def small_m_max() -> int:
    """Largest M that takes the split-K small-M forward (env override, else configs.SMALL_M_MAX)."""
    return env_nonnegative_int(SMALL_M_ENV, configs.SMALL_M_MAX)


# The one-launch forward (lora_forward_fused_kernel: h computed inside the GEMM, x read once) for
# M >= this many rows; 0 (the default) keeps the two-launch forward everywhere until a GPU measures
# which is faster (read per call, like the other thresholds).
FUSED_MIN_M_ENV = "LORA_KERNELS_FUSED_FORWARD_MIN_M"


FUSED_SCALE_MIN = 2.0 ** -60


def use_fused_forward(M: int, r: int, kind: str, arch: int, scale: float, k_contiguous: bool = True) -> bool:
    """Whether a forward of M rows (above the small-M path), rank r, dot kind and GPU family takes the
    one-launch kernel (its epilogue divides the fp32 base product by the scale and multiplies it back:
    only for 2^-60 <= |scale| <= 2^60, where neither step overflows nor loses precision to
    subnormals for any finite product of 16-bit or TF32 operands). ``k_contiguous``: x and a
    dense W both have unit stride along K; with any other stride of W (a transposed view: a Conv1D's
    weight) the kernel spills on sm_90 (``configs.TRANSPOSED_WEIGHT_KERNELS``), so such calls take
    the two-launch forward (x is made so first: ``unit_inner_stride``)."""
    min_m = env_nonnegative_int(FUSED_MIN_M_ENV, 0)
    return (0 < min_m <= M and FUSED_SCALE_MIN <= abs(scale) <= 1.0 / FUSED_SCALE_MIN and k_contiguous
            and configs.fused_forward_supported(configs.padded_rank(r), kind, arch))


# Overrides configs.TMA_MIN_M (read per call): the TMA GEMMs (lora_forward_gemm_tma_kernel,
# lora_grad_input_tma_kernel: operand tiles loaded by the Hopper tensor memory accelerator) for
# M >= this many rows; 0 keeps the pointer-based GEMMs everywhere.
TMA_MIN_M_ENV = "LORA_KERNELS_TMA_MIN_M"


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a TMA descriptor: unit inner stride, rows that do not overlap
    (a broadcast row stride of 0 is not a valid descriptor stride), 16-byte-aligned start and row
    stride (e.g. a contiguous 16-bit [.., K] tensor needs K % 8 == 0)."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0)


def use_tma(M: int, r: int, kind: str, arch: int, *operands: Optional[torch.Tensor]) -> bool:
    """Whether a GEMM over M rows takes its TMA kernel: switched on for M (LORA_KERNELS_TMA_MIN_M), a
    supported kind / GPU family, and ``operands`` (the big ones: x or dY, and W) that TMA can address
    (None, as an NF4 weight's dense tensor, never)."""
    min_m = env_nonnegative_int(TMA_MIN_M_ENV, configs.TMA_MIN_M)
    return (0 < min_m <= M and configs.tma_supported(configs.padded_rank(r), kind, arch)
            and all(t is not None and tma_compatible(t) for t in operands))


def fused_column_groups(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Column groups of the one-launch forward: enough programs (row blocks x groups) to fill the
    GPU, each group recomputing h for its rows, so no more than needed."""
    return max(1, min(n_tiles, cdiv(_target_programs(device), max(m_blocks, 1))))


def split_ranges(length: int, block: int, other_programs: int, device: torch.device):
    """Split a reduction dimension (M of dA/dB, K of small-M forward) into contiguous ranges of whole
    blocks so that splits * other_programs fills the device: returns (splits, length_per_split)."""
    blocks = cdiv(length, block)
    splits = max(1, min(blocks, cdiv(_target_programs(device), max(other_programs, 1))))
    per_split = cdiv(blocks, splits) * block
    return cdiv(length, per_split), per_split


def unit_inner_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t [R, C] itself when its rows are contiguous (stride 1 along C, or C <= 1), else a contiguous
    copy. Every kernel reads x and dY in tiles along their last dimension: with another stride there
    (a transposed view, a slice with a step) the compiled kernels spill, up to ~570 bytes on sm_90
    for the NF4 GEMMs (a one-off AOT compile of those specializations), and their loads are
    uncoalesced, where one copy is a single coalesced pass."""
    return t if t is None or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


@_launches_on(lambda x2: x2.device)
def triton_lora_forward(x2, weight, lora_A, lora_B, bias, scale: float, dropout_p: float, seed,
                        wq: Optional[NF4Tensors] = None):
    """(y2 [M, N] x.dtype, h [M, r] lora_A.dtype) for x2 [M, K]; bias is the combined bias or None.

    weight: dense [N, K], or with ``wq`` the NF4 packed codes (wq.packed)."""
    x2 = unit_inner_stride(x2)
    M, K = x2.shape
    N = lora_B.shape[0]
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the epilogues read bias[n] at unit stride (a strided or expanded view: N copies)
    r = lora_A.shape[0]
    R = configs.padded_rank(r)
    key = _config_key(x2.dtype, lora_A.dtype, x2.device)
    flags = _dot_flags(x2.dtype, lora_A.dtype)
    h = torch.empty((M, r), dtype=lora_A.dtype, device=x2.device)
    y2 = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    has_dropout = seed is not None

    small_m = M <= small_m_max()
    cublas_base = use_cublas_base(M, wq)
    k_contiguous = wq is not None or weight.stride(1) == 1  # x2's rows are contiguous (unit_inner_stride)
    if not small_m and not cublas_base and use_fused_forward(M, r, *key, scale, k_contiguous):
        cfg = _gemm_config(configs.fused_forward_config, wq, R, *key)
        w_ptrs, w_consts, w_opts = _weight_args(wq, cfg.blocks["BLOCK_K"])
        m_blocks = cdiv(M, cfg.blocks["BLOCK_M"])
        groups = fused_column_groups(m_blocks, cdiv(N, cfg.blocks["BLOCK_N"]), x2.device)
        launch_with_fma_option(lora_forward_fused_kernel, (m_blocks, groups),
            x2, weight, lora_A, lora_B, bias if bias is not None else y2, y2, h, seed if has_dropout else h,
            *w_ptrs,
            M, N, K, r, groups,
            x2.stride(0), x2.stride(1), *_weight_strides(weight, wq), lora_A.stride(0), lora_A.stride(1),
            h.stride(0), h.stride(1), lora_B.stride(0), lora_B.stride(1), y2.stride(0), y2.stride(1),
            drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p), scale,
            R=R, HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, **flags, **cfg.blocks, **w_consts,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **w_opts)
        return y2, h

    cfg = configs.shrink_config(R, *key)
    launch_with_fma_option(lora_shrink_kernel, (cdiv(M, cfg.blocks["BLOCK_M"]),),
        x2, lora_A, h, seed if has_dropout else h,
        M, K, r,
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        R=R, HAS_DROPOUT=has_dropout, LORA_PRECISION=flags["LORA_PRECISION"],
        UPCAST_DOT=flags["UPCAST_DOT"], **cfg.blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if cublas_base:
        _cublas_base_forward(x2, weight, wq, h, lora_B, bias, y2, scale, R, key, flags)
        return y2, h

    if not small_m and wq is None and use_tma(M, r, *key, x2, weight):
        cfg = configs.tma_forward_config(R, *key)
        block_m, block_n, block_k = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_K"]
        launch_with_fma_option(lora_forward_gemm_tma_kernel, (cdiv(M, block_m) * cdiv(N, block_n),),
            TensorDescriptor.from_tensor(x2, [block_m, block_k]),
            TensorDescriptor.from_tensor(weight, [block_n, block_k]),
            h, lora_B, bias if bias is not None else y2, y2,
            M, N, r,
            h.stride(0), h.stride(1), lora_B.stride(0), lora_B.stride(1), y2.stride(0), y2.stride(1),
            scale,
            R=R, HAS_BIAS=bias is not None, **flags, **cfg.blocks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y2, h

    cfg = _gemm_config(configs.forward_gemm_config, wq, R, *key, small_m=small_m)
    block_m, block_n, block_k = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_K"]
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    splits, k_per_split = split_ranges(K, block_k, tiles, x2.device) if small_m else (1, K)
    # Split-K (every small-M launch) writes fp32 partials [splits, M, N], summed below in a fixed
    # order, so results do not depend on scheduling.
    out = torch.empty((splits, M, N), dtype=torch.float32, device=x2.device) if small_m else y2
    out_2d = out[0] if small_m else out
    w_ptrs, w_consts, w_opts = _weight_args(wq, block_k)
    launch_with_fma_option(lora_forward_gemm_kernel, (tiles, splits),
        x2, weight, h, lora_B, bias if bias is not None else out, out, *w_ptrs,
        M, N, K, r, k_per_split,
        x2.stride(0), x2.stride(1), *_weight_strides(weight, wq), h.stride(0), h.stride(1),
        lora_B.stride(0), lora_B.stride(1), M * N if small_m else 0, out_2d.stride(0), out_2d.stride(1),
        scale,
        R=R, HAS_BIAS=bias is not None, SPLIT_K=small_m, **flags, **cfg.blocks, **w_consts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **w_opts)
    if small_m:
        y2.copy_(out.sum(0) if splits > 1 else out_2d)
    return y2, h


def _cublas_base_forward(x2, weight, wq: Optional[NF4Tensors], h, lora_B, bias, y2, scale: float, R: int, key,
                         flags):
    """y2 = x2 @ W^T + scale * h @ B^T + bias for a large M: the LoRA term and bias from the forward
    GEMM kernel with an empty K-loop (its epilogue, adapters in their dtype), then x2 @ W^T added by
    cuBLAS: a dense W at once, an NF4 one a slab of rows at a time (decoded into a bounded buffer: no
    full-precision copy of W exists; the slabs' columns of y2 are disjoint, so the result does not
    depend on the slab size)."""
    M, K = x2.shape
    N = lora_B.shape[0]
    cfg = configs.forward_gemm_config(R, *key, "dense")
    tiles = cdiv(M, cfg.blocks["BLOCK_M"]) * cdiv(N, cfg.blocks["BLOCK_N"])
    w_ptrs, w_consts, _ = _weight_args(None)
    launch_with_fma_option(lora_forward_gemm_kernel, (tiles, 1),
        x2, x2, h, lora_B, bias if bias is not None else y2, y2, *w_ptrs,
        M, N, 0, h.shape[1], 0,
        x2.stride(0), x2.stride(1), 0, 0, h.stride(0), h.stride(1),
        lora_B.stride(0), lora_B.stride(1), 0, y2.stride(0), y2.stride(1),
        scale,
        R=R, HAS_BIAS=bias is not None, SPLIT_K=False, **flags, **cfg.blocks, **w_consts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if wq is None:
        y2.addmm_(x2, weight.t())
        return
    # bitsandbytes' decoder (ops.bnb_dequantize) decodes in the stored dtype before the cast to x's:
    # the larger of the two sizes the slab
    rows = _slab_extent(K, N, max(x2.element_size(), wq.dtype.itemsize), 64)
    decode = _row_slab_decoder(wq, x2.dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        y2[:, n0:n1].addmm_(x2, decode(n0, n1).t())


def _row_slab_decoder(wq: NF4Tensors, dtype: torch.dtype):
    """decode(n0, n1): W[n0:n1] (whole rows) as a contiguous tensor in ``dtype``, each slab by
    ``_nf4_dequantize_slab``'s choice; when that is bitsandbytes' kernel for every slab (rows starting on
    a quantization block: K % blocksize == 0), its block scales are decoded once for all of them."""
    quant_type = nf4_gemv.bnb_slab_quant_type(wq, 0, 0, wq.K)
    if quant_type is None or wq.K % wq.blocksize:
        return lambda n0, n1: _nf4_dequantize_slab(wq, n0, n1, 0, wq.K, dtype)
    scaled = with_decoded_scales(wq)
    return lambda n0, n1: bnb_dequantize_rows(scaled, n0, n1, quant_type, dtype)


def _cublas_base_grad_input(grad_y2, weight, wq: Optional[NF4Tensors], d_h, lora_A, seed, dx2, dropout_p: float,
                            R: int, key, flags):
    """dx2 = keep * (dH @ A) / (1 - p) + dY @ W for a large M: the masked LoRA term from the dX kernel
    with an empty N-loop, then dY @ W added by cuBLAS (an NF4 W one slab of columns at a time:
    bounded buffer; disjoint columns of dx2)."""
    N = grad_y2.shape[1]
    K = lora_A.shape[1]
    _lora_grad_input_term(grad_y2, d_h, lora_A, seed, dx2, dropout_p, R, key, flags)
    if wq is None:
        dx2.addmm_(grad_y2, weight)
        return
    cols = _slab_extent(N, K, grad_y2.element_size(), 64)
    for k0 in range(0, K, cols):
        k1 = min(K, k0 + cols)
        dx2[:, k0:k1].addmm_(grad_y2, _nf4_dequantize_slab(wq, 0, N, k0, k1, grad_y2.dtype))


def _use_cuda_grad_input(grad_y2, wq: NF4Tensors) -> bool:
    """``nf4_gemv.use_cuda_grad_input``, by a name of this module: the CPU tests patch it to take the
    CUDA dX route with an emulated kernel."""
    return nf4_gemv.use_cuda_grad_input(grad_y2, wq)


def _cuda_base_grad_input(grad_y2, wq: NF4Tensors, d_h, lora_A, seed, dropout_p: float, R: int, key, flags):
    """dx2 [M, K] = keep * (dH @ A) / (1 - p) + dY @ W for a small M: the masked LoRA term from the dX
    kernel with an empty N-loop into an fp32 buffer, then the CUDA kernel of csrc/ adds dY @ W (W
    decoded in registers, never stored) and rounds once."""
    init = torch.empty((grad_y2.shape[0], lora_A.shape[1]), dtype=torch.float32, device=grad_y2.device)
    _lora_grad_input_term(grad_y2, d_h, lora_A, seed, init, dropout_p, R, key, flags)
    return nf4_gemv.cuda_grad_input(grad_y2, wq, init)


def _lora_grad_input_term(grad_y2, d_h, lora_A, seed, out, dropout_p: float, R: int, key, flags):
    """out = keep * (dH @ A) / (1 - p) (in out's dtype): the dX kernel with an empty N-loop."""
    M = grad_y2.shape[0]
    K = lora_A.shape[1]
    cfg = configs.grad_input_config(R, *key, "dense")
    grid = (cdiv(M, cfg.blocks["BLOCK_M"]) * cdiv(K, cfg.blocks["BLOCK_K"]),)
    w_ptrs, w_consts, _ = _weight_args(None)
    launch_with_fma_option(lora_grad_input_kernel, grid,
        grad_y2, grad_y2, d_h, lora_A, seed if seed is not None else d_h, out, *w_ptrs,
        M, 0, K, lora_A.shape[0],
        grad_y2.stride(0), grad_y2.stride(1), 0, 0,
        d_h.stride(0), d_h.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(0), out.stride(1),
        drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        R=R, HAS_DROPOUT=seed is not None, **flags, **cfg.blocks, **w_consts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _sum_partials(ws: torch.Tensor) -> torch.Tensor:
    """ws [splits, ...] summed over splits in a fixed order; one split is the sum itself (a view:
    one host op less)."""
    return ws[0] if ws.shape[0] == 1 else ws.sum(0)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _weight_strides(weight, wq):
    # NF4 tiles are addressed by flat index n * K + k; the strides are unused there.
    return (0, 0) if wq is not None else (weight.stride(0), weight.stride(1))


@_launches_on(lambda grad_y2: grad_y2.device)
def triton_lora_backward(grad_y2, x2, weight, lora_A, lora_B, h, seed, scale: float,
                         dropout_p: float, need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
                         wq: Optional[NF4Tensors] = None):
    """(dx2, dA, dB, dbias) with None for what is not needed; same contract as torch_lora_backward.

    weight: dense [N, K], or with ``wq`` the NF4 packed codes (wq.packed)."""
    grad_y2, x2 = unit_inner_stride(grad_y2), unit_inner_stride(x2)
    M, N = grad_y2.shape
    K = lora_A.shape[1]
    r = lora_A.shape[0]
    R = configs.padded_rank(r)
    device = grad_y2.device
    key = _config_key(grad_y2.dtype, lora_A.dtype, device)
    flags = _dot_flags(grad_y2.dtype, lora_A.dtype)
    lora_flags = {k: v for k, v in flags.items() if k != "DOT_PRECISION"}
    has_dropout = seed is not None
    # dA's kernel scales by keep_scale whatever HAS_DROPOUT says: without a seed no dropout ran
    keep_scale = 1.0 / (1.0 - dropout_p) if has_dropout else 1.0
    need_dh = need_x or need_A
    f32 = {"dtype": torch.float32, "device": device}

    dx2 = d_a = d_b = d_bias = d_h = None
    if need_dh or need_B or need_bias:
        cfg = configs.grad_out_pass_config(R, *key)
        n_tiles = cdiv(N, cfg.blocks["BLOCK_N"])
        splits, rows_per_split = split_ranges(M, cfg.blocks["BLOCK_M"], n_tiles, device)
        dh_ws = torch.empty((n_tiles, M, r), **f32) if need_dh else None
        db_ws = torch.empty((splits, N, r), **f32) if need_B else None
        colsum_ws = torch.empty((splits, N), **f32) if need_bias else None
        # Workspaces not needed get a stand-in pointer the kernel never touches (its NEED_* flag is
        # off): one of the others, fp32 and aligned like them, instead of one more allocation.
        dummy = next(t for t in (dh_ws, db_ws, colsum_ws) if t is not None)
        dh_ws, db_ws, colsum_ws = (t if t is not None else dummy for t in (dh_ws, db_ws, colsum_ws))
        launch_with_fma_option(lora_grad_out_pass_kernel, (n_tiles, splits),
            grad_y2, lora_B, h if need_B else dummy, dh_ws, db_ws, colsum_ws,
            M, N, r, rows_per_split,
            grad_y2.stride(0), grad_y2.stride(1), lora_B.stride(0), lora_B.stride(1),
            h.stride(0) if need_B else 0, h.stride(1) if need_B else 0,
            scale,
            R=R, NEED_DH=need_dh, NEED_DB=need_B, NEED_COLSUM=need_bias, **lora_flags, **cfg.blocks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        # Fixed-order reductions of the (scaled) partials keep the backward deterministic.
        if need_dh:
            d_h = _sum_partials(dh_ws)
        if need_B:
            d_b = _as_dtype(_sum_partials(db_ws), lora_B.dtype)
        if need_bias:
            d_bias = _sum_partials(colsum_ws)

    if need_x and wq is not None and _use_cuda_grad_input(grad_y2, wq):
        dx2 = _cuda_base_grad_input(grad_y2, wq, d_h, lora_A, seed if has_dropout else None, dropout_p, R, key, flags)
    elif need_x and use_cublas_base(M, wq):
        dx2 = torch.empty((M, K), dtype=grad_y2.dtype, device=device)
        _cublas_base_grad_input(grad_y2, weight, wq, d_h, lora_A, seed if has_dropout else None, dx2, dropout_p, R,
                                key, flags)
    elif need_x and wq is None and use_tma(M, r, *key, grad_y2, weight):
        dx2 = torch.empty((M, K), dtype=grad_y2.dtype, device=device)
        cfg = configs.tma_grad_input_config(R, *key)
        block_m, block_n, block_k = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_K"]
        launch_with_fma_option(lora_grad_input_tma_kernel, (cdiv(M, block_m) * cdiv(K, block_k),),
            TensorDescriptor.from_tensor(grad_y2, [block_m, block_n]),
            TensorDescriptor.from_tensor(weight, [block_n, block_k]),
            d_h, lora_A, seed if has_dropout else d_h, dx2,
            M, K, r,
            d_h.stride(0), d_h.stride(1), lora_A.stride(0), lora_A.stride(1), dx2.stride(0), dx2.stride(1),
            drop_threshold(dropout_p), keep_scale,
            R=R, HAS_DROPOUT=has_dropout, **flags, **cfg.blocks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif need_x:
        dx2 = torch.empty((M, K), dtype=grad_y2.dtype, device=device)
        cfg = _gemm_config(configs.grad_input_config, wq, R, *key)
        grid = (cdiv(M, cfg.blocks["BLOCK_M"]) * cdiv(K, cfg.blocks["BLOCK_K"]),)
        w_ptrs, w_consts, w_opts = _weight_args(wq, cfg.blocks["BLOCK_K"])
        launch_with_fma_option(lora_grad_input_kernel, grid,
            grad_y2, weight, d_h, lora_A, seed if has_dropout else d_h, dx2, *w_ptrs,
            M, N, K, r,
            grad_y2.stride(0), grad_y2.stride(1), *_weight_strides(weight, wq),
            d_h.stride(0), d_h.stride(1), lora_A.stride(0), lora_A.stride(1),
            dx2.stride(0), dx2.stride(1),
            drop_threshold(dropout_p), keep_scale,
            R=R, HAS_DROPOUT=has_dropout, **flags, **cfg.blocks, **w_consts,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **w_opts)

    if need_A:
        cfg = configs.grad_a_config(R, *key)
        k_tiles = cdiv(K, cfg.blocks["BLOCK_K"])
        splits, rows_per_split = split_ranges(M, cfg.blocks["BLOCK_M"], k_tiles, device)
        da_ws = torch.empty((splits, r, K), **f32)
        launch_with_fma_option(lora_grad_a_kernel, (k_tiles, splits),
            x2, d_h, seed if has_dropout else d_h, da_ws,
            M, K, r, rows_per_split,
            x2.stride(0), x2.stride(1), d_h.stride(0), d_h.stride(1),
            drop_threshold(dropout_p), keep_scale,
            R=R, HAS_DROPOUT=has_dropout, LORA_FP32=lora_A.dtype == torch.float32, **lora_flags,
            **cfg.blocks,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        d_a = _as_dtype(_sum_partials(da_ws), lora_A.dtype)
    return dx2, d_a, d_b, d_bias
