"""The fixed table of tile configurations the launchers use (no autotuning: launches are
deterministic, and this same table is what `.ci/run` compiles ahead of time for sm_80 and sm_90).

A configuration is chosen from the padded rank R (16..256), the dot kind and the GPU family:
    kind  "half"        16-bit x and 16-bit adapters (tensor-core dots)
          "half_lora32" 16-bit x, fp32 adapters (LoRA dots in tf32)
          "tf32"        fp32 x, tf32 dots (torch.get_float32_matmul_precision() != "highest")
          "ieee"        fp32 x, exact fp32 FMA dots (torch's default "highest")
    arch  80 (Ampere/Ada: mma.sync) or 90 (Hopper and newer: wgmma)
Rank-heavy kernels hold [tile, R] fp32 accumulators, so their tiles shrink as R grows; FMA dots
("ieee") need smaller tiles than tensor-core dots. Every entry was compiled for sm_80 and sm_90
and checked for register spills (python -m lora_kernels.tools.aot_check) with triton 3.9 (ptxas
12.9, what CI installs) and triton 3.6 (ptxas 12.8, the GPU machine's): a few sm_80 entries are
smaller than sm_90's because ptxas 12.8 spilled there.
"""
import functools
import types
from dataclasses import dataclass, field

MIN_PADDED_RANK = 16  # tl.dot needs every dimension >= 16
MAX_RANK = 256
PADDED_RANKS = (16, 32, 64, 128, 256)
DOT_KINDS = ("half", "half_lora32", "tf32", "ieee")
ARCHS = (80, 90)
# Ranks up to this padded value are the "main" configurations: CI fails if they spill.
MAIN_MAX_PADDED_RANK = 64


@dataclass(frozen=True)
class TileConfig:
    """Block sizes (kernel constexpr names, a read-only mapping) plus launch options."""

    blocks: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        # The *_config functions below return one shared instance per argument tuple (cached: they
        # run several times per layer call), so its blocks must not change under other callers.
        object.__setattr__(self, "blocks", types.MappingProxyType(dict(self.blocks)))


# What the launchers call per launch, cached: the tables are fixed, each call builds a config (~2 us).
_cached = functools.lru_cache(maxsize=None)


def padded_rank(r: int) -> int:
    """Smallest power of two >= max(r, 16)."""
    p = MIN_PADDED_RANK
    while p < r:
        p *= 2
    return p


def dot_kind(x_is_fp32: bool, adapters_fp32: bool, fp32_precision: str) -> str:
    """Dot kind for x / adapter dtypes; fp32_precision is "ieee" or "tf32" (fp32 x only)."""
    if x_is_fp32:
        return fp32_precision
    return "half_lora32" if adapters_fp32 else "half"


def arch_family(capability: tuple) -> int:
    """80 for sm_8x, 90 for sm_90 and newer."""
    return 90 if capability[0] >= 9 else 80


@_cached
def shrink_config(R: int, kind: str, arch: int) -> TileConfig:
    """h = dropout(x) @ A^T: acc [BLOCK_M, R], K-loop over BLOCK_K (dropout hash on each x tile)."""
    if kind == "ieee":
        return TileConfig({"BLOCK_M": 16 if R == 256 else 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    if kind == "half":
        block_k = 128 if R <= 64 else 64
    else:
        block_k = 64
    if R <= 64:
        return TileConfig({"BLOCK_M": 64, "BLOCK_K": block_k}, num_warps=4, num_stages=3)
    return TileConfig({"BLOCK_M": 32 if R == 256 else 64, "BLOCK_K": 64}, num_warps=8, num_stages=2)


# Dense CUDA calls of at most this many rows without dropout take the lean PyTorch path (cuBLAS;
# ops.lora_linear.select_backend): there the GPU work is microseconds and the time is the host's
# launches. On an H200 at M = 16 (benchmarks/results/nvidia-h200/bench_bfloat16.json) the plain
# PyTorch composition (torch_unfused rows) ran the forward in 0.03-0.06 ms against 0.16-0.18 ms for
# the Triton route, and forward+backward in 0.32-0.48 ms against 1.05-1.19 ms. The route itself
# (same semantics and saving rules as the Triton path) was not yet timed there. Overridden per call
# by LORA_KERNELS_DENSE_TORCH_MAX_M (0: Triton at every M).
DENSE_TORCH_MAX_M = 16

# Forward calls with M <= SMALL_M_MAX rows take the small-M configuration and run split-K: with a
# 16-row tile the GEMM is weight-bandwidth bound, and splitting K fills the GPU. Provisional value,
# not yet measured on a GPU (bitsandbytes switches from its fused 4-bit GEMV at M ~ 16-64 on H100).
SMALL_M_MAX = 16


def _small_m_config(R: int, kind: str, arch: int, weight_format: str) -> TileConfig:
    """Forward tile for M <= SMALL_M_MAX: 16 rows (tl.dot's minimum), narrow N tiles for many programs."""
    if kind == "ieee":
        return TileConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "R_CHUNK": 16},
                          num_warps=4, num_stages=2)
    r_chunk = min(R, 32)
    if weight_format == "nf4":
        # sm_80: triton 3.6's NF4 decode (ptxas 12.8) needs 168 registers and spills 8-40 B at
        # BLOCK_K=64; half the K step fits in 128 (and 16-wide rank chunks keep R >= 128 from
        # spilling under triton 3.9).
        block_k = 32 if arch < 90 else 64
        if arch < 90 and (R >= 128 or kind == "half_lora32"):
            r_chunk = 16  # (fp32 adapters: the tile decode's halves spill 8 B at 32-wide chunks, triton 3.9)
    else:
        block_k = 64 if kind == "tf32" else 128
    # NF4 tiles are decoded in registers, so deeper pipelining buys little and costs registers.
    return TileConfig({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k, "GROUP_M": 1,
                       "R_CHUNK": r_chunk}, num_warps=4, num_stages=2 if weight_format == "nf4" else 3)


@_cached
def forward_gemm_config(R: int, kind: str, arch: int, weight_format: str = "dense",
                        small_m: bool = False, nf4_aligned: bool = True) -> TileConfig:
    """y tile [BLOCK_M, BLOCK_N], K-loop over BLOCK_K; the rank loop takes R_CHUNK at a time.

    NF4 weights decode their [BLOCK_K, BLOCK_N] tile in registers (per element: code byte, table
    value, block scale), so they take smaller weight tiles; nf4_aligned: see ``_nf4_gemm_config``.
    small_m: see SMALL_M_MAX."""
    if small_m:
        return _small_m_config(R, kind, arch, weight_format)
    if weight_format == "nf4":
        return _nf4_gemm_config(R, kind, arch, "BLOCK_N", "BLOCK_K", nf4_aligned)
    if kind == "ieee":
        return TileConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "R_CHUNK": 16},
                          num_warps=4, num_stages=2)
    if kind == "tf32":
        return TileConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8,
                           "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=3)
    if arch >= 90 and (R <= 32 or kind == "half"):
        return TileConfig({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8,
                           "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=3)
    return TileConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                       "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=3)


# The one-launch forward (lora_forward_fused_kernel) holds h [BLOCK_M, R] in registers beside the
# y tile for the whole program: ranks up to this padded value take it (when switched on), on sm_90
# (wgmma reads x from shared memory; with sm_80's register operands it spills) and with
# tensor-core dots (the exact-fp32 FMA dots spill).
FUSED_MAX_PADDED_RANK = 32


def fused_forward_supported(R: int, kind: str, arch: int) -> bool:
    """Whether the one-launch forward may run for padded rank R, dot kind and GPU family."""
    return R <= FUSED_MAX_PADDED_RANK and kind != "ieee" and arch >= 90


@_cached
def fused_forward_config(R: int, kind: str, arch: int, weight_format: str = "dense",
                         nf4_aligned: bool = True) -> TileConfig:
    """The forward GEMM's tiles (``forward_gemm_config``) with row blocks and column groups in place of
    the grouped tile order and the rank in one dot; narrower where h and its x tile would not fit
    beside the y tile: fp32 adapters with 16-bit x (the x tile converted to fp32 for the rank dot)
    and NF4 weights. Launched only where ``fused_forward_supported``."""
    cfg = forward_gemm_config(min(R, FUSED_MAX_PADDED_RANK), kind, arch, weight_format, nf4_aligned=nf4_aligned)
    blocks = {k: v for k, v in cfg.blocks.items() if k not in ("GROUP_M", "R_CHUNK")}
    if kind == "half_lora32":
        blocks["BLOCK_N"] = min(blocks["BLOCK_N"], 128)
    if weight_format == "nf4":  # the decoded W tile is in registers too
        blocks["BLOCK_N"] = min(blocks["BLOCK_N"], 64)
    # 2 stages: with 3, triton 3.6 (ptxas 12.8) spills 16-24 B at 255 registers.
    return TileConfig(blocks, num_warps=cfg.num_warps, num_stages=2)


# The TMA GEMMs (forward and dX) from this many rows. Measured on an H200 (bf16, r = 16,
# benchmarks/results/nvidia-h200/bench_bfloat16.json, rows lora_kernels_tma vs lora_kernels) at
# M = 8192 on the three goal shapes: forward 0.86-0.91x and backward 0.81-0.84x the pointer GEMMs'
# time; fwd+bwd timed together 0.86-0.88x at two shapes, 1.15x at 4096 x 4096 (against its own
# forward and backward timed apart, 0.85x: an outlier). At M = 16 the forward is split-K either way
# and only dX would change, with no consistent gain: no rows between were measured, so the
# threshold is the measured point. Overridden per call by LORA_KERNELS_TMA_MIN_M (0: off).
TMA_MIN_M = 8192


def tma_supported(R: int, kind: str, arch: int) -> bool:
    """Whether the TMA GEMMs (forward, dX) may run: Hopper and newer, tensor-core dots (any padded
    rank: the rank only enters their LoRA terms, as in the pointer-based GEMMs)."""
    return kind != "ieee" and arch >= 90


@_cached
def tma_forward_config(R: int, kind: str, arch: int) -> TileConfig:
    """The dense forward GEMM's tiles (``forward_gemm_config``): the TMA kernel differs only in how
    its x and W tiles reach shared memory. Launched only where ``tma_supported``."""
    return forward_gemm_config(R, kind, arch, "dense")


@_cached
def tma_grad_input_config(R: int, kind: str, arch: int) -> TileConfig:
    """The dense dX GEMM's tiles (``grad_input_config``), for its TMA variant (``tma_supported``)."""
    return grad_input_config(R, kind, arch, "dense")


def _nf4_gemm_config(R: int, kind: str, arch: int, out_block: str, red_block: str,
                     aligned: bool = True) -> TileConfig:
    """GEMM tiles for an NF4 weight: output tile [BLOCK_M, out_block], reduction step red_block.

    aligned (``ops.triton_launch.nf4_aligned``: K % blocksize == 0 and tiles inside one block per
    row): the tile's K extent (BLOCK_K: the forward's reduction, dX's output columns) divides bnb's
    64-element blocks, for the fast decode (one scale per tile row). Other weights decode per
    element, which needs twice the shared memory per stage at BLOCK_K = 64 on sm_90 (256 KiB with 3
    stages: over the limit), so they keep a 32-wide reduction step."""
    if kind == "ieee":
        # sm_80, dX: the tile decode's two half-width accumulators spill 8 B at 32 rows (ptxas 12.8)
        block_m = 16 if arch < 90 and out_block == "BLOCK_K" and aligned else 32
        return TileConfig({"BLOCK_M": block_m, out_block: 32, red_block: 32, "GROUP_M": 8, "R_CHUNK": 16},
                          num_warps=4, num_stages=2)
    # fp32 tiles take twice the registers of 16-bit ones. sm_80: a third stage (122 KiB of shared
    # memory, one program per SM either way) spills under triton 3.6 (ptxas 12.8) at R >= 128.
    if not aligned:
        blocks = {out_block: 128, red_block: 32}
    elif out_block == "BLOCK_N":
        blocks = {"BLOCK_N": 128, "BLOCK_K": 64 if arch >= 90 else 32}
    else:
        blocks = {"BLOCK_K": 64, "BLOCK_N": 64 if arch >= 90 else 32}
    return TileConfig({"BLOCK_M": 64 if kind == "tf32" else 128, **blocks, "GROUP_M": 8,
                       "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=2 if arch < 90 else 3)


@_cached
def grad_input_config(R: int, kind: str, arch: int, weight_format: str = "dense",
                      nf4_aligned: bool = True) -> TileConfig:
    """dX tile [BLOCK_M, BLOCK_K], reduction over N in BLOCK_N steps (dropout mask on the tile)."""
    if weight_format == "nf4":
        return _nf4_gemm_config(R, kind, arch, "BLOCK_K", "BLOCK_N", nf4_aligned)
    if kind == "ieee":
        # sm_80: 64 rows spill 8 B under triton 3.6 (ptxas 12.8); 32 rows do not under 3.6 or 3.9.
        return TileConfig({"BLOCK_M": 32 if arch < 90 else 64, "BLOCK_K": 64, "BLOCK_N": 32, "GROUP_M": 8,
                           "R_CHUNK": 16}, num_warps=4, num_stages=2)
    if kind == "tf32":
        return TileConfig({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 32, "GROUP_M": 8,
                           "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=3)
    return TileConfig({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 8,
                       "R_CHUNK": min(R, 32)}, num_warps=8, num_stages=3)


@_cached
def grad_out_pass_config(R: int, kind: str, arch: int) -> TileConfig:
    """One dY tile [BLOCK_M, BLOCK_N] per step; dH partials [BLOCK_M, R], dB acc [BLOCK_N, R].

    A wide BLOCK_N keeps the dH partial traffic (M * r * 4 bytes per N-tile) small next to dY.
    """
    if kind == "ieee":
        block_n = {16: 128, 32: 64}.get(R, 32)
        return TileConfig({"BLOCK_M": 16 if R == 256 else 32, "BLOCK_N": block_n}, num_warps=8,
                          num_stages=2)
    block_m = 64 if kind == "half" else 32
    if R <= 32:
        return TileConfig({"BLOCK_M": block_m, "BLOCK_N": 256}, num_warps=8, num_stages=2)
    if R == 64:
        return TileConfig({"BLOCK_M": block_m, "BLOCK_N": 128}, num_warps=8, num_stages=2)
    return TileConfig({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2)


@_cached
def grad_a_config(R: int, kind: str, arch: int) -> TileConfig:
    """dA partial acc [R, BLOCK_K] over an M-split in BLOCK_M steps (dropout hash on each x tile)."""
    if kind == "ieee":
        if R >= 128:
            return TileConfig({"BLOCK_M": 32, "BLOCK_K": 16}, num_warps=8, num_stages=2)
        return TileConfig({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    if R <= 64:
        block_k = 128 if kind == "half" else 64
        # sm_80 16-bit: a third stage spills 8 B under triton 3.6 (ptxas 12.8).
        stages = 2 if arch < 90 and kind == "half" else 3
        return TileConfig({"BLOCK_M": 64, "BLOCK_K": block_k}, num_warps=4, num_stages=stages)
    return TileConfig({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2)


@_cached
def nf4_dequantize_config() -> TileConfig:
    """Flat decode: BLOCK elements per program (memory bound; 4 warps keep loads in flight)."""
    return TileConfig({"BLOCK": 1024}, num_warps=4, num_stages=1)


@_cached
def nf4_dequantize_tiles_config(blocksize: int) -> TileConfig:
    """Aligned slab decode (``nf4_dequantize_tiles_kernel``): [32, BLOCK_K] tiles, BLOCK_K dividing
    the quantization block (memory bound)."""
    return TileConfig({"BLOCK_N": 32, "BLOCK_K": min(64, blocksize)}, num_warps=4, num_stages=1)


# NF4 forwards (and their dX) of at least this many rows run the base product on cuBLAS over the
# weight decoded a bounded slab at a time (NF4_SLAB_BYTES, never the whole weight: see
# ops.triton_launch), the LoRA terms and bias in the Triton kernels' epilogues. Large M amortizes
# one decode of W per call, where the fused GEMMs decode each weight tile once per row block of x.
# 0 = off; overridden per call by LORA_KERNELS_NF4_CUBLAS_MIN_M. Measured on an H200
# (benchmarks/results/nvidia-h200/bench_qlora_bfloat16.json, rows lora_kernels_nf4_cublas vs
# lora_kernels_nf4_triton): from M = 64 the slab path's forward is faster on all three Llama shapes
# (0.39 vs 0.94 ms at 4096x4096, 2.1 vs 3.9 ms at 8192x28672) and its fwd+bwd equal or faster; at
# M = 1024-8192 it is 2-30x faster; at M = 32 the two are mixed.
NF4_CUBLAS_MIN_M = 64
NF4_SLAB_BYTES = 16 << 20
# The same route for a dense base weight (no decode: cuBLAS reads W itself) from this many rows:
# the LoRA term and bias from the GEMM kernels' epilogues (one extra write and read of y, or of dX,
# against the fused Triton GEMMs), the base products at cuBLAS speed. On an H200 the Triton forward
# GEMM took 1.02-1.21x the cuBLAS base matmul at M = 8192 (bench_bfloat16.json) and fwd+bwd 1.01-1.13x
# PEFT's time; this route has not run on a GPU yet, so it is off (0) until measured: the bench's
# lora_kernels_cublas row times it. Overridden per call by LORA_KERNELS_DENSE_CUBLAS_MIN_M.
DENSE_CUBLAS_MIN_M = 0


# Kernels with a split-K small-M configuration (forward_gemm_config(..., small_m=True)).
SMALL_M_KERNELS = ("lora_forward_gemm_kernel",)
# Kernels that read the base weight W take it dense or as bitsandbytes NF4 (W_NF4).
WEIGHT_FORMATS = {"lora_forward_gemm_kernel": ("dense", "nf4"), "lora_grad_input_kernel": ("dense", "nf4"),
                  "lora_forward_fused_kernel": ("dense", "nf4")}
# Kernels launched with a dense W whose unit stride runs along N (a transposed view: transformers'
# Conv1D keeps W [in, out], and the PEFT patch passes W^T). The one-launch forward is not: with W's
# tiles contiguous along N it spills on sm_90 (aot_check), so the launcher keeps it to weights with
# unit stride along K and takes the two-launch forward otherwise.
TRANSPOSED_WEIGHT_KERNELS = ("lora_forward_gemm_kernel", "lora_grad_input_kernel")
# Kernels launched only for some (padded rank, dot kind, GPU family): name -> predicate.
LAUNCH_LIMITS = {"lora_forward_fused_kernel": fused_forward_supported,
                 "lora_forward_gemm_tma_kernel": tma_supported, "lora_grad_input_tma_kernel": tma_supported}

# name -> (module of the kernel, config function). Used by the launchers and the AOT check.
KERNEL_CONFIGS = {
    "lora_shrink_kernel": ("lora_kernels.kernels.lora_forward", shrink_config),
    "lora_forward_gemm_kernel": ("lora_kernels.kernels.lora_forward", forward_gemm_config),
    "lora_forward_fused_kernel": ("lora_kernels.kernels.lora_forward", fused_forward_config),
    "lora_forward_gemm_tma_kernel": ("lora_kernels.kernels.lora_forward", tma_forward_config),
    "lora_grad_out_pass_kernel": ("lora_kernels.kernels.lora_backward", grad_out_pass_config),
    "lora_grad_input_kernel": ("lora_kernels.kernels.lora_backward", grad_input_config),
    "lora_grad_input_tma_kernel": ("lora_kernels.kernels.lora_backward", tma_grad_input_config),
    "lora_grad_a_kernel": ("lora_kernels.kernels.lora_backward", grad_a_config),
}
