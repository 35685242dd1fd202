// The tensor-core NF4 decode GEMV (the op lora_kernels::nf4_gemv_lora with kernel = 1), device code
// and the choice of its template instance, shared by its launcher (nf4_gemv_mma.cu) and the CPU
// emulation (csrc/emulation/): the hardware operations (mma.sync, cp.async, shared loads) have an
// emulated branch under LORA_KERNELS_EMULATION.
#pragma once
#include "nf4_device.cuh"

#include <vector_types.h>

#include <type_traits>

namespace lora_kernels {

// Tensor-core decode GEMV (kernel = 1): the same op for weights whose rows hold whole 256-weight
// passes (K % 256 == 0), blocksize 64 (bitsandbytes' default, the only size QLoRA uses), sm_80+.
//
// Why: the SIMT kernel (nf4_gemv_lora.cu) spends ~9 instructions per weight (sm_90 SASS of its
// M = 1 loop: a table load, the product with the block scale, a rounding to bf16 -- conversions run
// at a quarter of the FP32 rate -- and the FMA): instruction bound far below the copy bandwidth, and
// one FMA more per weight for every row of x. Here (sm_90 SASS: ~3.5 instructions per weight in the
// loop, for any M <= 16; ~31 weights per clock per SM are needed at an H200's copy bandwidth):
//  * A weight is never formed. A packed byte is looked up in a 256-entry table of NF4 code pairs in
//    x's dtype; the entry is directly an mma.sync A-fragment register (two consecutive k of a row).
//    The table has one copy per lane (word = byte * 32 + lane): a warp's lookups never conflict.
//  * m16n8k16 mma.sync multiplies the 16 rows of W by up to 8 (NT = 1) or 16 (NT = 2) rows of x in
//    fp32. A 64-weight group (4 k-steps) is one quantization block: its fp32 partial sums are
//    multiplied by the block scale once (decoded from the double-quantized absmax as bnb does). The
//    result is x * dequantize_4bit(Q)^T up to the rounding of each weight to its stored dtype (bnb
//    rounds code * absmax; we round only the code, to x's dtype, as bnb's own GEMV does).
//  * Fragment layout (PTX ISA, mma.m16n8k16 .bf16/.f16): lane = 4 gid + tig holds A rows gid and
//    gid + 8 at columns 2 tig + {0, 1} (registers a0, a1) and 2 tig + 8 + {0, 1} (a2, a3), B column
//    gid at rows 2 tig + {0, 1} and 2 tig + 8 + {0, 1}, C rows gid / gid + 8, columns 2 tig + {0, 1}.
//    The k order inside a group is permuted (a sum does not care): lane tig owns the group's bytes
//    8 tig .. 8 tig + 7 (weights 16 tig .. 16 tig + 15) of rows gid and gid + 8; at k-step j its
//    bytes 2j and 2j + 1 are columns 2 tig (+1) and 2 tig + 8 (+1), i.e. weights 16 tig + 4j + {0,1}
//    and 16 tig + 4j + {2,3}, and its B registers hold x at exactly those k: the 16 consecutive
//    values x[gid, 16 tig ..] of the group, two 16-byte loads (L1 hits after the first tile).
//  * Memory: each warp streams its own passes (4 groups of its 16 rows: 2 KiB of codes plus the
//    scales) through a private ring of STAGES shared-memory buffers with cp.async, STAGES - 1 passes
//    ahead of the one it multiplies, across tile boundaries: at 16 warps per SM that is 64 KiB of
//    loads in flight (sm_90, 3 stages) without holding them in registers. Each lane copies exactly
//    the bytes it later reads, so the ring needs no barrier, only cp.async.wait_group.
//  * Block = 16 warps on one 16-row tile, splitting its passes; partial sums are reduced through
//    shared memory, then the epilogue adds s * h B^T + bias (the tile's B rows and bias are loaded
//    when the tile starts, so their latency is hidden by its passes). Blocks are persistent (one per
//    SM), so the table is built once per SM.
//  * After the shrink kernel with programmatic dependent launch (sm_90), the LoRA term is deferred:
//    each tile's base sums go to an fp32 scratch buffer (`pending`, [N, kCols]: L2-resident, M N 4
//    bytes against the weight's N K / 2) and a tail pass adds s * h B^T + bias to all of the block's
//    outputs once h is there. Waiting for h after the first tile instead would expose most of the
//    shrink kernel (a few microseconds, latency bound) in a GEMV of ~7-30 us at M = 1.
constexpr int kMmaWarps = 16;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kPassGroups = 4;  // 64-weight groups per pass: one 4-byte word of absmax codes per row
constexpr int kTileRows = 16;   // rows of W per tile: the mma's M
constexpr int kMaxCols = 16;    // rows of x per tile at most (NT = 2)
// Dynamic shared memory (bytes): the table, the cross-warp reduction, h, the tile's rows of B and
// bias, the absmax code table, then each warp's ring. A stage holds one pass: codes
// [group][row lo/hi][lane] (8 bytes each), scales [row][lane] (4 absmax codes, or 4 fp32 absmax),
// second-level scale [row][lane].
constexpr int kTableBytes = 256 * 32 * 4;
constexpr int kRedOffset = kTableBytes;
constexpr int kHOffset = kRedOffset + kMmaWarps * kTileRows * kMaxCols * 4;
constexpr int kBOffset = kHOffset + kMaxCols * kMaxRank * 4;
constexpr int kBiasOffset = kBOffset + kTileRows * kMaxRank * 4;
constexpr int kCode2Offset = kBiasOffset + kTileRows * 4;
constexpr int kStagesOffset = kCode2Offset + 256 * 4;
constexpr int kStageCodeBytes = kPassGroups * 2 * 32 * 8;
constexpr int kStageScaleOffset = kStageCodeBytes;
constexpr int kStageNestedOffset = kStageScaleOffset + 2 * 32 * 16;
constexpr int kStageBytes = kStageNestedOffset + 2 * 32 * 4;
__host__ __device__ constexpr int mma_smem_bytes(int stages) {
  return kStagesOffset + kMmaWarps * stages * kStageBytes;
}

template <typename T> __device__ __forceinline__ uint32_t bits16(float v);
template <> __device__ __forceinline__ uint32_t bits16<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <> __device__ __forceinline__ uint32_t bits16<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// c += A (16x16, row) * B (16x8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(LORA_KERNELS_EMULATION)
  emulation::mma_m16n8k16<T>(c, a0, a1, a2, a3, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the host checks the compute capability
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// cp.async (sm_80+): global -> shared without registers; a thread sees its own copies after
// cp.async.wait_group.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src) {
#if defined(LORA_KERNELS_EMULATION)
  emulation::cp_async(dst, src, BYTES);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(BYTES) : "memory");
  }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(LORA_KERNELS_EMULATION)
  emulation::cp_async_commit();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LORA_KERNELS_EMULATION)
  emulation::cp_async_wait(PENDING);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#endif
}

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
#if defined(LORA_KERNELS_EMULATION)
  return emulation::load_shared<uint32_t>(addr);
#else
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
#endif
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
#if defined(LORA_KERNELS_EMULATION)
  return emulation::load_shared<uint2>(addr);
#else
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
#endif
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a constant after unrolling
}

// Byte offset of the table entry for the byte at bit `bit` of w, in this lane's copy: byte * 128
// (32 lanes x 4 bytes) or'ed with 4 * lane (< 128): one shift and one LOP3 per lookup.
__device__ __forceinline__ uint32_t table_offset(uint32_t w, int bit, uint32_t lane4) {
  const uint32_t shifted = bit >= 7 ? (w >> (bit - 7)) : (w << (7 - bit));  // bit is a constant after unrolling
  return (shifted & 0x7f80u) | lane4;
}

// One warp's position in its stream of passes: the k-th of the block's tiles, the j-th of the
// warp's passes in it (pass warp + 16 j).
struct PassCursor {
  int k, j;
  __device__ __forceinline__ void advance(int passes_per_tile) {
    if (++j == passes_per_tile) { j = 0; ++k; }
  }
};

// Issues the cp.async copies of one pass (rows gid, gid + 8 of the tile; this lane's bytes) into `stage`.
template <bool DQ>
__device__ __forceinline__ void issue_pass(const NF4Args& q, uint32_t stage, int64_t tile, int pass, int64_t N,
                                           int64_t K, int lane, int gid, int tig) {
  const int n_groups = static_cast<int>(K >> 6);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t row = min(tile * kTileRows + gid + 8 * rr, N - 1);  // rows past N: computed, never written
    const uint8_t* codes = q.packed + row * (K >> 1) + pass * (kPassGroups * 32) + tig * 8;
#pragma unroll
    for (int u = 0; u < kPassGroups; ++u) {
      cp_async<8>(stage + ((u * 2 + rr) * 32 + lane) * 8, codes + u * 32);
    }
    const uint32_t group = static_cast<uint32_t>(row * n_groups) + pass * kPassGroups;  // a multiple of 4
    if (DQ) {
      cp_async<4>(stage + kStageScaleOffset + (rr * 32 + lane) * 4, static_cast<const uint8_t*>(q.absmax) + group);
      // the pass's 4 blocks share one second-level scale (nested block size >= 4: checked on the host)
      cp_async<4>(stage + kStageNestedOffset + (rr * 32 + lane) * 4,
                  q.absmax_scale + (group >> q.log2_nested_blocksize));
    } else {
      cp_async<16>(stage + kStageScaleOffset + (rr * 32 + lane) * 16, static_cast<const float*>(q.absmax) + group);
    }
  }
}

template <typename T, typename TA, int NT, bool DQ, int STAGES>
__global__ void __launch_bounds__(kMmaThreads, 1)
nf4_gemv_mma_kernel(const T* __restrict__ x, NF4Args q, const TA* __restrict__ h, const TA* __restrict__ B,
                    const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ pending, int M, int64_t N,
                    int64_t K, int r, int64_t stride_xm, float scale) {
  constexpr int kCols = 8 * NT;  // rows of x per tile (the mma's N, times NT)
  LK_DYNAMIC_SHARED(smem);
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float (*red_s)[kTileRows][kMaxCols] = reinterpret_cast<float (*)[kTileRows][kMaxCols]>(smem + kRedOffset);
  float (*h_s)[kMaxRank] = reinterpret_cast<float (*)[kMaxRank]>(smem + kHOffset);
  float* b_s = reinterpret_cast<float*>(smem + kBOffset);  // [kTileRows][r] of the current tile
  float* bias_s = reinterpret_cast<float*>(smem + kBiasOffset);
  float* code2_s = reinterpret_cast<float*>(smem + kCode2Offset);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t n_tiles = (N + kTileRows - 1) / kTileRows;
  const int n_passes = static_cast<int>(K >> 8);
  const int my_passes = n_passes > warp ? (n_passes - warp + kMmaWarps - 1) / kMmaWarps : 0;  // per tile
  const int my_tiles = static_cast<int>((n_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x);  // grid <= n_tiles
  const int n_items = my_tiles * my_passes;  // this warp's passes over all its tiles
  const uint32_t ring = smem_base + kStagesOffset + warp * (STAGES * kStageBytes);

  // Start the stream first: the copies fly while the tables are built.
  PassCursor next{0, 0};
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_items) {
      issue_pass<DQ>(q, ring + s * kStageBytes, blockIdx.x + static_cast<int64_t>(next.k) * gridDim.x,
                     warp + next.j * kMmaWarps, N, K, lane, gid, tig);
      next.advance(my_passes);
    }
    cp_async_commit();
  }

  // The table: byte v -> (code[v >> 4] in the low half, code[v & 15] in the high half): the high
  // nibble is the first (lower k) weight, and a fragment register holds its lower column low.
  for (int i = threadIdx.x; i < 256 * 8; i += kMmaThreads) {
    const int v = i >> 3;
    const uint32_t pair = bits16<T>(__ldg(q.code + (v >> 4))) | (bits16<T>(__ldg(q.code + (v & 15))) << 16);
    reinterpret_cast<uint4*>(table)[i] = make_uint4(pair, pair, pair, pair);  // words 4i .. 4i + 3
  }
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += kMmaThreads) code2_s[i] = q.absmax_code[i];
  }
  __syncthreads();

  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;
  const float offset = DQ ? *q.absmax_offset : 0.f;
  const T* x_lane[NT];  // this lane's x values of group 0 (row gid + 8 nt of x), nullptr past M
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = gid + 8 * nt;
    x_lane[nt] = m < M ? x + m * stride_xm + tig * 16 : nullptr;
  }
  bool h_ready = false;
  int item = 0;

  for (int k = 0; k < my_tiles; ++k) {  // the same count for every warp of the block: barriers match
    const int64_t tile = blockIdx.x + static_cast<int64_t>(k) * gridDim.x;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    }
    // The epilogue's B rows and bias, loaded now so that their latency passes during the tile's
    // passes (read in the epilogue, each thread would wait a memory latency per rank, per tile):
    // 16 x r <= 1024 values, two per thread. Not with a deferred LoRA term (the tail reads them).
    float b_pre[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int idx = threadIdx.x + e * kMmaThreads;
      b_pre[e] = 0.f;
      if (pending == nullptr && idx < kTileRows * r) {
        const int64_t n = min(tile * kTileRows + idx / r, N - 1);
        b_pre[e] = to_float<TA>(B[n * r + idx % r]);
      }
    }
    const float bias_pre = (pending == nullptr && bias != nullptr && threadIdx.x < kTileRows)
                               ? bias[min(tile * kTileRows + threadIdx.x, N - 1)]
                               : 0.f;
    for (int j = 0; j < my_passes; ++j, ++item) {
      if (item + STAGES - 1 < n_items) {
        issue_pass<DQ>(q, ring + ((item + STAGES - 1) % STAGES) * kStageBytes,
                       blockIdx.x + static_cast<int64_t>(next.k) * gridDim.x, warp + next.j * kMmaWarps, N, K, lane,
                       gid, tig);
        next.advance(my_passes);
      }
      cp_async_commit();  // possibly empty: one group per item keeps the count below exact
      cp_async_wait<STAGES - 1>();  // this item's copies have landed
      const uint32_t stage = ring + (item % STAGES) * kStageBytes;
      const int pass = warp + j * kMmaWarps;

      // The pass's 4 block scales of rows lo / hi: 4 absmax codes and one second-level scale per row
      // (double quantization), or 4 fp32 absmax (one 16-byte word) per row.
      uint32_t codes_lo = 0, codes_hi = 0;
      float nested_lo = 0.f, nested_hi = 0.f;
      if (DQ) {
        codes_lo = lds32(stage + kStageScaleOffset + lane * 4);
        codes_hi = lds32(stage + kStageScaleOffset + (32 + lane) * 4);
        nested_lo = __uint_as_float(lds32(stage + kStageNestedOffset + lane * 4));
        nested_hi = __uint_as_float(lds32(stage + kStageNestedOffset + (32 + lane) * 4));
      }
      // Not unrolled: one group's fragments live at a time (unrolled, the compiler hoists all four
      // groups' table lookups and x loads, and 128 registers per thread do not hold them).
#pragma unroll 1
      for (int u = 0; u < kPassGroups; ++u) {
        float s_lo, s_hi;
        if (DQ) {  // absmax = fl(fl(code2[q] * scale2) + offset), as bnb decodes it
          s_lo = __fadd_rn(__fmul_rn(code2_s[(codes_lo >> (8 * u)) & 0xffu], nested_lo), offset);
          s_hi = __fadd_rn(__fmul_rn(code2_s[(codes_hi >> (8 * u)) & 0xffu], nested_hi), offset);
        } else {
          s_lo = __uint_as_float(lds32(stage + kStageScaleOffset + lane * 16 + u * 4));
          s_hi = __uint_as_float(lds32(stage + kStageScaleOffset + (32 + lane) * 16 + u * 4));
        }
        const uint2 c_lo = lds64(stage + ((u * 2) * 32 + lane) * 8);
        const uint2 c_hi = lds64(stage + ((u * 2 + 1) * 32 + lane) * 8);
        uint4 xv[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (x_lane[nt] != nullptr) {  // rows of x past M are zero
            const T* xp = x_lane[nt] + (pass * kPassGroups + u) * 64;
            xv[nt][0] = __ldg(reinterpret_cast<const uint4*>(xp));
            xv[nt][1] = __ldg(reinterpret_cast<const uint4*>(xp + 8));
          } else {
            xv[nt][0] = xv[nt][1] = make_uint4(0u, 0u, 0u, 0u);
          }
        }
        float part[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) part[nt][i] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {  // k-steps
          // bytes 2s and 2s + 1 of the lane's 8: word s / 2, bits 16 (s % 2) and 16 (s % 2) + 8
          const uint32_t w_lo = s < 2 ? c_lo.x : c_lo.y, w_hi = s < 2 ? c_hi.x : c_hi.y;
          const int bit = (s & 1) * 16;
          const uint32_t a0 = lds32(smem_base + table_offset(w_lo, bit, lane4));
          const uint32_t a1 = lds32(smem_base + table_offset(w_hi, bit, lane4));
          const uint32_t a2 = lds32(smem_base + table_offset(w_lo, bit + 8, lane4));
          const uint32_t a3 = lds32(smem_base + table_offset(w_hi, bit + 8, lane4));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            // x values 4s .. 4s + 3 of the lane's 16: words 2 (s % 2) and 2 (s % 2) + 1 of load s / 2
            const uint4& xw = xv[nt][s >> 1];
            mma_16816<T>(part[nt], a0, a1, a2, a3, word_of(xw, (s & 1) * 2), word_of(xw, (s & 1) * 2 + 1));
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {  // C rows gid (lo) and gid + 8 (hi): one block scale each
          acc[nt][0] = fmaf(s_lo, part[nt][0], acc[nt][0]);
          acc[nt][1] = fmaf(s_lo, part[nt][1], acc[nt][1]);
          acc[nt][2] = fmaf(s_hi, part[nt][2], acc[nt][2]);
          acc[nt][3] = fmaf(s_hi, part[nt][3], acc[nt][3]);
        }
      }
    }

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      red_s[warp][gid][8 * nt + 2 * tig] = acc[nt][0];
      red_s[warp][gid][8 * nt + 2 * tig + 1] = acc[nt][1];
      red_s[warp][gid + 8][8 * nt + 2 * tig] = acc[nt][2];
      red_s[warp][gid + 8][8 * nt + 2 * tig + 1] = acc[nt][3];
    }
    if (pending != nullptr) {  // deferred LoRA term: the tile's base sums wait in pending for the tail
      __syncthreads();
      for (int o = threadIdx.x; o < kTileRows * kCols; o += kMmaThreads) {
        const int row = o / kCols, m = o % kCols;
        const int64_t n = tile * kTileRows + row;
        if (m < M && n < N) {
          float v = 0.f;
#pragma unroll
          for (int w = 0; w < kMmaWarps; ++w) v += red_s[w][row][m];
          pending[n * kCols + m] = v;
        }
      }
      __syncthreads();  // red_s is rewritten by the next tile
      continue;
    }
    if (!h_ready) {  // once per block, after its first tile: the shrink kernel has had that long
      wait_for_prior_grid();
      for (int i = threadIdx.x; i < kCols * kMaxRank; i += kMmaThreads) {
        const int m = i / kMaxRank, jr = i % kMaxRank;
        h_s[m][jr] = (m < M && jr < r) ? to_float<TA>(h[m * r + jr]) : 0.f;
      }
      h_ready = true;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int idx = threadIdx.x + e * kMmaThreads;
      if (idx < kTileRows * r) b_s[idx] = b_pre[e];
    }
    if (threadIdx.x < kTileRows) bias_s[threadIdx.x] = bias_pre;
    __syncthreads();
    for (int o = threadIdx.x; o < kTileRows * kCols; o += kMmaThreads) {
      const int row = o / kCols, m = o % kCols;
      const int64_t n = tile * kTileRows + row;
      if (m < M && n < N) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kMmaWarps; ++w) v += red_s[w][row][m];
        float lora = 0.f;
        for (int i = 0; i < r; ++i) lora = fmaf(h_s[m][i], b_s[row * r + i], lora);
        v = fmaf(scale, lora, v);
        y[m * N + n] = from_float<T>(bias != nullptr ? v + bias_s[row] : v);
      }
    }
    __syncthreads();  // red_s, b_s and bias_s are rewritten by the next tile
  }
  if (pending != nullptr) {
    // The tail of a deferred LoRA term: h is waited for only now, after every pass of every tile
    // of the block (on sm_90 the shrink kernel ran meanwhile), then each output of the block's
    // tiles takes its base sum back, s * h B^T (B read per output: independent loads) and the bias,
    // in the immediate epilogue's order of operations (the same bits).
    wait_for_prior_grid();
    for (int i = threadIdx.x; i < kCols * kMaxRank; i += kMmaThreads) {
      const int m = i / kMaxRank, jr = i % kMaxRank;
      h_s[m][jr] = (m < M && jr < r) ? to_float<TA>(h[m * r + jr]) : 0.f;
    }
    __syncthreads();  // h_s, and the pending sums the other threads wrote
    for (int o = threadIdx.x; o < my_tiles * kTileRows * kCols; o += kMmaThreads) {
      const int t = o / (kTileRows * kCols), row = (o / kCols) % kTileRows, m = o % kCols;
      const int64_t n = (blockIdx.x + static_cast<int64_t>(t) * gridDim.x) * kTileRows + row;
      if (m < M && n < N) {
        float lora = 0.f;
        for (int i = 0; i < r; ++i) lora = fmaf(h_s[m][i], to_float<TA>(B[n * r + i]), lora);
        const float v = fmaf(scale, lora, pending[n * kCols + m]);
        y[m * N + n] = from_float<T>(bias != nullptr ? v + bias[n] : v);
      }
    }
  }
  cp_async_wait<0>();  // nothing may still be writing this block's shared memory when it exits
}

// Ring depth: 3 stages where shared memory allows (sm_90: 227 KiB per block), else 2 (sm_80: 163 KiB).
inline int mma_stages(int max_shared_per_block_optin) {
  return max_shared_per_block_optin >= mma_smem_bytes(3) ? 3 : 2;
}
// Floats of the deferred LoRA term's scratch buffer for N rows of W: [tiles * 16, kMaxCols] (rows past
// N included: the kernel indexes it by the row of W).
inline int64_t mma_pending_floats(int64_t N) { return (N + kTileRows - 1) / kTileRows * kTileRows * kMaxCols; }
// Persistent blocks: one per SM, never more than the tiles of 16 rows of W.
inline dim3 mma_grid(int64_t N, int64_t sms) {
  const int64_t n_tiles = (N + kTileRows - 1) / kTileRows;
  return dim3(static_cast<unsigned>(n_tiles < sms ? n_tiles : sms));
}
// A kernel instance as a type, so that a generic lambda is instantiated (with its statics) per kernel.
template <auto KERNEL>
struct KernelTag {
  static constexpr auto kernel = KERNEL;
};
// Calls f(KernelTag<instance>(), dynamic shared bytes) for M rows of x (NT = 1 up to 8 rows, else 2),
// double quantization or not, and the ring depth.
template <typename T, typename TA, int NT, typename F>
void with_mma_instance(bool dq, int stages, F&& f) {
  if (dq) {
    if (stages == 3) f(KernelTag<nf4_gemv_mma_kernel<T, TA, NT, true, 3>>(), mma_smem_bytes(3));
    else f(KernelTag<nf4_gemv_mma_kernel<T, TA, NT, true, 2>>(), mma_smem_bytes(2));
  } else {
    if (stages == 3) f(KernelTag<nf4_gemv_mma_kernel<T, TA, NT, false, 3>>(), mma_smem_bytes(3));
    else f(KernelTag<nf4_gemv_mma_kernel<T, TA, NT, false, 2>>(), mma_smem_bytes(2));
  }
}
template <typename T, typename TA, typename F>
void with_mma_kernel(int64_t M, bool dq, int stages, F&& f) {
  if (M <= 8) with_mma_instance<T, TA, 1>(dq, stages, f);
  else with_mma_instance<T, TA, 2>(dq, stages, f);
}

}  // namespace lora_kernels
