// NF4 decode GEMV with the LoRA term fused: y = x dequant(Q)^T + bias + scale * h B^T, h = x A^T,
// for M <= 16 rows (token-by-token decoding, small batches), where the cost is the bytes of Q.
//
// Format (bitsandbytes NF4, see lora_kernels/ops/nf4.py): the [N, K] weight flattened row-major,
// two 4-bit codes per byte (first element in the HIGH nibble), one absmax per `blocksize`
// consecutive elements (blocks may span rows), absmax either fp32 or double-quantized
// (uint8 code into a 256-entry fp32 table, times an fp32 scale per `nested_blocksize` blocks,
// plus an fp32 offset). Block scales are decoded exactly as bitsandbytes' dequantize_4bit does:
// absmax = fl(fl(code2[q] * scale2) + offset). Built without --use_fast_math and with explicit
// __fmul_rn / __fadd_rn so nothing is contracted into an FMA.
//
// Two launches: a shrink kernel h = x A^T ([M, r], rounded to the adapters' dtype like the Triton
// path), then the decode GEMV whose epilogue adds scale * h B^T and the combined bias. The LoRA
// term cannot live in one launch without a grid-wide dependency (every output row needs all of h);
// on sm_90 the tensor-core GEMV overlaps the shrink kernel (programmatic dependent launch).
//
// Two decode GEMVs, chosen by the op's `kernel` argument (lora_kernels/ops/nf4_gemv.py decides):
//  kernel 0, SIMT (any K, any power-of-two block size): each weight is decoded bit-exactly as
//    dequantize_4bit does, w = round_to_stored_dtype(fl(NF4[c] * absmax)) then rounded to x's dtype,
//    and multiplied by x on the FP32 pipe. R output rows per warp (4 for M <= 2, 2 for M <= 8, 1
//    above: x is read from shared memory once for all R), 8 warps per block. The block walks K in
//    chunks of kChunk elements: x[:, chunk] is staged in shared memory once for all 8 warps, then each
//    lane decodes 32 consecutive weights of each of its rows per step from one 16-byte load of packed
//    codes per row (fast path: K a multiple of 32 and a 16-byte aligned packed pointer, so every
//    16-byte load is aligned and lies in one quantization block) or element by element (any K).
//    Accumulation is fp32 per (row of W, row of x), reduced across the warp with shuffles at the end.
//    Measured on an H200 (benchmarks/results/nvidia-h200/gemv_bfloat16.json): correct, but 0.22x the
//    copy bandwidth at M = 1 and a time linear in M (instruction bound: see the tensor-core kernel).
//  kernel 1, tensor cores (K % 256 == 0, blocksize 64, sm_80+): nf4_gemv_mma_kernel.cuh.
//
// This header holds the kernels (device code only, also compiled by the CPU emulation of
// csrc/emulation/) and the choice of their template instance and launch geometry, which the
// launchers of nf4_gemv_lora.cu and the emulation share.
#pragma once
#include "nf4_device.cuh"

#include <vector_types.h>

#include <cstddef>
#include <type_traits>

namespace lora_kernels {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 1024;  // K elements staged per step (x tile: M_TILE x kChunk)

// The two 16-bit values packed in a 32-bit word (element 2i in the low half, 2i+1 in the high half,
// little endian), as floats: x is read from shared memory 16 bytes at a time.
template <typename T> __device__ __forceinline__ float lo_to_float(uint32_t u);
template <typename T> __device__ __forceinline__ float hi_to_float(uint32_t u);
template <> __device__ __forceinline__ float lo_to_float<__nv_bfloat16>(uint32_t u) { return __uint_as_float(u << 16); }
template <> __device__ __forceinline__ float hi_to_float<__nv_bfloat16>(uint32_t u) {
  return __uint_as_float(u & 0xffff0000u);
}
template <> __device__ __forceinline__ float lo_to_float<__half>(uint32_t u) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
}
template <> __device__ __forceinline__ float hi_to_float<__half>(uint32_t u) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}

// fl(NF4[c] * absmax) rounded to the stored dtype, then to x's dtype T, as a float. STORED_IS_X (the
// stored dtype is T, the common case): one rounding, since rounding again to the same format is exact;
// it saves two conversions per weight in a loop that is instruction bound.
template <typename T, bool STORED_IS_X>
__device__ __forceinline__ float decode(const float* nf4, int c, float absmax, int stored) {
  float w = __fmul_rn(nf4[c], absmax);
  if (STORED_IS_X) {
    return to_float<T>(from_float<T>(w));
  }
  if (stored == kFloat16) {
    w = __half2float(__float2half_rn(w));
  } else if (stored == kBFloat16) {
    w = __bfloat162float(__float2bfloat16_rn(w));
  }
  return to_float<T>(from_float<T>(w));
}
template <bool DQ>
__device__ __forceinline__ float block_absmax(const NF4Args& q, const float* code2_s, int64_t b, float offset) {
  if (DQ) {
    const uint8_t qa = static_cast<const uint8_t*>(q.absmax)[b];
    return __fadd_rn(__fmul_rn(code2_s[qa], q.absmax_scale[b >> q.log2_nested_blocksize]), offset);
  }
  return static_cast<const float*>(q.absmax)[b];
}
// h[m, j] = sum_k x[m, k] A[j, k]: one block per (j, m), a block-wide reduction over K.
template <typename T, typename TA>
__global__ void lora_shrink_kernel(const T* __restrict__ x, const TA* __restrict__ A, TA* __restrict__ h,
                                   int64_t K, int64_t r, int64_t stride_xm) {
  allow_dependent_launch();  // the tensor-core GEMV may start streaming its weight now (it waits for h)
  const int64_t j = blockIdx.x, m = blockIdx.y;
  const T* x_row = x + m * stride_xm;
  const TA* a_row = A + j * K;
  // the adapters' dtype decides the product's precision, as x.to(A.dtype) does in PEFT
  auto product = [](T xv, TA av) { return to_float<TA>(from_float<TA>(to_float<T>(xv))) * to_float<TA>(av); };
  // r * M blocks only (16 at M = 1, r = 16): a loop with one load pair in flight per thread waits a
  // memory latency per 256 elements, which the H200 measured as the GEMV's whole LoRA overhead (10-19 us
  // at M = 1, K = 4096-8192: linear in K). kShrinkUnroll independent accumulators keep that many
  // load pairs in flight per thread.
  constexpr int kShrinkUnroll = 8;
  float part[kShrinkUnroll];
#pragma unroll
  for (int u = 0; u < kShrinkUnroll; ++u) part[u] = 0.f;
  const int64_t stride = blockDim.x;
  int64_t k = threadIdx.x;
  for (; k + (kShrinkUnroll - 1) * stride < K; k += kShrinkUnroll * stride) {
    T xv[kShrinkUnroll];
    TA av[kShrinkUnroll];
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) {  // all loads first, then the products
      xv[u] = x_row[k + u * stride];
      av[u] = a_row[k + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kShrinkUnroll; ++u) part[u] += product(xv[u], av[u]);
  }
  for (; k < K; k += stride) part[0] += product(x_row[k], a_row[k]);
  float acc = 0.f;
#pragma unroll
  for (int u = 0; u < kShrinkUnroll; ++u) acc += part[u];
  __shared__ float partial[kWarps];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x == 0) h[m * r + j] = from_float<TA>(acc);
  }
}

// Output rows per warp: the warp reads x from shared memory once for all of them (shared-memory
// bandwidth, not DRAM, is the limit at small M), and fewer rows when more rows of x need registers.
__host__ __device__ constexpr int rows_per_warp(int m_tile) { return m_tile <= 2 ? 4 : (m_tile <= 8 ? 2 : 1); }

template <typename T, typename TA, int M_TILE, bool DQ, bool STORED_IS_X>
__global__ void __launch_bounds__(kThreads)
nf4_gemv_lora_kernel(const T* __restrict__ x, NF4Args q, const TA* __restrict__ h, const TA* __restrict__ B,
                     const float* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N, int64_t K,
                     int64_t r, int64_t stride_xm, float scale, bool vector_path) {
  constexpr int R = rows_per_warp(M_TILE);
  LK_DYNAMIC_SHARED(smem_raw);
  T* x_s = reinterpret_cast<T*>(smem_raw);                     // [M_TILE][kChunk]
  __shared__ float nf4_s[16];
  __shared__ float code2_s[256];
  __shared__ float h_s[M_TILE][kMaxRank];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // This warp's output rows n0 .. n0 + R - 1; rows past N are computed on row N - 1 (no divergence,
  // no out-of-bounds read) and never written.
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  int64_t row_start[R];  // flat index of each row's first weight
#pragma unroll
  for (int j = 0; j < R; ++j) row_start[j] = (n0 + j < N ? n0 + j : N - 1) * K;
  if (threadIdx.x < 16) nf4_s[threadIdx.x] = q.code[threadIdx.x];
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += kThreads) code2_s[i] = q.absmax_code[i];
  }
  for (int i = threadIdx.x; i < M_TILE * kMaxRank; i += kThreads) {
    const int m = i / kMaxRank, j = i % kMaxRank;
    h_s[m][j] = (m < M && j < r) ? to_float<TA>(h[m * r + j]) : 0.f;
  }
  const float offset = DQ ? *q.absmax_offset : 0.f;
  // The tables and h_s are read by other threads; the chunk loop's barrier covers them only when it
  // runs (K > 0), the epilogue reads h_s either way.
  __syncthreads();

  float acc[R][M_TILE];
#pragma unroll
  for (int j = 0; j < R; ++j) {
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) acc[j][m] = 0.f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t len = K - k0 < kChunk ? K - k0 : kChunk;
    __syncthreads();  // previous chunk consumed
    for (int64_t i = threadIdx.x; i < M_TILE * kChunk; i += kThreads) {
      const int64_t m = i / kChunk, k = i % kChunk;
      x_s[i] = (m < M && k < len) ? x[m * stride_xm + k0 + k] : from_float<T>(0.f);
    }
    __syncthreads();
    if (n0 >= N) continue;  // no early return: the warp still takes part in the block's barriers
    if (vector_path) {
      const int word_rotation = (lane >> 1) & 3;
      // 32 weights per lane and row per step, one aligned 16-byte load per row, all in one
      // quantization block (K % 32 == 0 and blocks are multiples of 32).
      for (int64_t k = static_cast<int64_t>(lane) * 32; k < len; k += 32 * 32) {
        uint4 bytes[R];
        float absmax[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const int64_t e = row_start[j] + k0 + k;
          bytes[j] = __ldg(reinterpret_cast<const uint4*>(q.packed + e / 2));
          absmax[j] = block_absmax<DQ>(q, code2_s, e >> q.log2_blocksize, offset);
        }
#pragma unroll
        for (int wj = 0; wj < 4; ++wj) {
          // Each lane takes the four words in its own rotated order: lanes are 64 bytes of x_s apart,
          // so in the same order 16 lanes would hit the same bank; rotated by (lane >> 1) & 3 the
          // 16-byte reads of a quarter warp fall in 8 different bank groups.
          const int wi = (wj + word_rotation) & 3;
          float w[R][8];  // the word's 8 weights of each row, decoded once for all rows of x
#pragma unroll
          for (int j = 0; j < R; ++j) {
            // selects, not an indexed local array (which would live on the stack)
            const uint32_t word = wi == 0 ? bytes[j].x : wi == 1 ? bytes[j].y : wi == 2 ? bytes[j].z : bytes[j].w;
#pragma unroll
            for (int bi = 0; bi < 4; ++bi) {
              const uint32_t byte = (word >> (8 * bi)) & 0xffu;
              w[j][2 * bi] = decode<T, STORED_IS_X>(nf4_s, byte >> 4, absmax[j], q.stored);
              w[j][2 * bi + 1] = decode<T, STORED_IS_X>(nf4_s, byte & 0xfu, absmax[j], q.stored);
            }
          }
          // x[m, k + 8 wi : k + 8 wi + 8]: one 16-byte shared load per row of x, used by all R rows
          // (16-byte aligned: k is a multiple of 32 elements, x_s is __align__(16))
          const T* x_word = x_s + static_cast<int>(k) + wi * 8;
#pragma unroll
          for (int m = 0; m < M_TILE; ++m) {
            const uint4 xv = *reinterpret_cast<const uint4*>(x_word + m * kChunk);
            const float x0 = lo_to_float<T>(xv.x), x1 = hi_to_float<T>(xv.x), x2 = lo_to_float<T>(xv.y),
                        x3 = hi_to_float<T>(xv.y), x4 = lo_to_float<T>(xv.z), x5 = hi_to_float<T>(xv.z),
                        x6 = lo_to_float<T>(xv.w), x7 = hi_to_float<T>(xv.w);
#pragma unroll
            for (int j = 0; j < R; ++j) {
              acc[j][m] += w[j][0] * x0 + w[j][1] * x1;
              acc[j][m] += w[j][2] * x2 + w[j][3] * x3;
              acc[j][m] += w[j][4] * x4 + w[j][5] * x5;
              acc[j][m] += w[j][6] * x6 + w[j][7] * x7;
            }
          }
        }
      }
    } else {
      // Any K: element by element (rows may start mid-byte and mid-block).
      for (int64_t k = lane; k < len; k += 32) {
        float w[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const int64_t e = row_start[j] + k0 + k;
          const uint8_t byte = __ldg(q.packed + e / 2);
          const int c = (e & 1) ? (byte & 0xf) : (byte >> 4);
          const float absmax = block_absmax<DQ>(q, code2_s, e >> q.log2_blocksize, offset);
          w[j] = decode<T, STORED_IS_X>(nf4_s, c, absmax, q.stored);
        }
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) {
          const float xm = to_float<T>(x_s[m * kChunk + k]);
#pragma unroll
          for (int j = 0; j < R; ++j) acc[j][m] += w[j] * xm;
        }
      }
    }
  }
  if (n0 >= N) return;  // past the last barrier

#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int64_t n = n0 + j;
    if (n >= N) break;  // warp-uniform
    // LoRA term: scale * sum_i h[m, i] B[n, i], lanes over the rank, folded into the same reduction.
    for (int64_t i = lane; i < r; i += 32) {
      const float b = to_float<TA>(B[n * r + i]);
#pragma unroll
      for (int m = 0; m < M_TILE; ++m) acc[j][m] += scale * (h_s[m][i] * b);
    }
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
      float v = acc[j][m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m < M) y[m * N + n] = from_float<T>(bias != nullptr ? v + bias[n] : v);
    }
  }
}

// Slab decode for the large-M route (the base products on cuBLAS over slabs of the decoded weight):
// out[i, j] = W[n0 + i, k0 + j], each value decoded bit-exactly as dequantize_4bit does (rounded to
// the stored dtype, then to out's dtype T). Memory bound: 4 bytes of codes in, 8 values out per
// thread and step (one 16-byte store for 16-bit T), consecutive threads on consecutive columns;
// blockIdx.y walks rows (strided: a slab may have more rows than a grid's y extent). Needs K, k0 and
// the slab's width to be multiples of 8 (the 8 values are one aligned 32-bit word of codes, inside one
// quantization block).
template <typename T, bool DQ, bool STORED_IS_X>
__global__ void __launch_bounds__(kThreads)
nf4_dequantize_slab_kernel(NF4Args q, T* __restrict__ out, int64_t K, int64_t n0, int64_t k0, int64_t rows,
                           int64_t cols8) {
  __shared__ float nf4_s[16];
  __shared__ float code2_s[256];
  if (threadIdx.x < 16) nf4_s[threadIdx.x] = q.code[threadIdx.x];
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += kThreads) code2_s[i] = q.absmax_code[i];
  }
  __syncthreads();
  const float offset = DQ ? *q.absmax_offset : 0.f;
  const int64_t c8 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c8 >= cols8) return;  // after the only barrier
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t e = (n0 + row) * K + k0 + c8 * 8;  // flat index of the 8 values: a multiple of 8
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(q.packed + (e >> 1)));
    const float absmax = block_absmax<DQ>(q, code2_s, e >> q.log2_blocksize, offset);
    float w[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // byte b holds values 2b (high nibble) and 2b + 1
      const uint32_t byte = (word >> (8 * b)) & 0xffu;
      w[2 * b] = decode<T, STORED_IS_X>(nf4_s, byte >> 4, absmax, q.stored);
      w[2 * b + 1] = decode<T, STORED_IS_X>(nf4_s, byte & 0xfu, absmax, q.stored);
    }
    T* dst = out + row * (cols8 * 8) + c8 * 8;
    if constexpr (std::is_same<T, float>::value) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(w[0], w[1], w[2], w[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(w[4], w[5], w[6], w[7]);
    } else {
      uint32_t packed[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {  // two 16-bit values per word, the first in the low half
        T lo = from_float<T>(w[2 * p]), hi = from_float<T>(w[2 * p + 1]);
        packed[p] = static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&lo)) |
                    (static_cast<uint32_t>(*reinterpret_cast<uint16_t*>(&hi)) << 16);
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

// ---- instances and launch geometry (host side, shared with the emulation)

// Calls f(std::integral_constant<int, M_TILE>()) with the smallest SIMT tile (1, 2, 4, 8 or 16 rows
// of x) that holds M rows.
template <typename F>
void with_m_tile(int64_t M, F&& f) {
  if (M <= 1) f(std::integral_constant<int, 1>());
  else if (M <= 2) f(std::integral_constant<int, 2>());
  else if (M <= 4) f(std::integral_constant<int, 4>());
  else if (M <= 8) f(std::integral_constant<int, 8>());
  else f(std::integral_constant<int, 16>());
}
// The SIMT GEMV instance for a weight with (dq) or without double quantization, stored in x's dtype
// or not; its grid for N rows of W and its dynamic shared memory (x's chunk).
template <typename T, typename TA, int M_TILE>
auto simt_gemv_kernel(bool dq, bool stored_is_x) {
  return dq ? (stored_is_x ? nf4_gemv_lora_kernel<T, TA, M_TILE, true, true>
                           : nf4_gemv_lora_kernel<T, TA, M_TILE, true, false>)
            : (stored_is_x ? nf4_gemv_lora_kernel<T, TA, M_TILE, false, true>
                           : nf4_gemv_lora_kernel<T, TA, M_TILE, false, false>);
}
inline dim3 simt_gemv_grid(int64_t N, int m_tile) {
  const int64_t rows_per_block = static_cast<int64_t>(kWarps) * rows_per_warp(m_tile);
  return dim3(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block));
}
// The SIMT GEMV's fast path: K a multiple of 32 and 16-byte aligned codes, so that every 16-byte load
// of codes is aligned and lies in one quantization block.
inline bool simt_vector_path(int64_t K, const uint8_t* packed) {
  return K % 32 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0;
}
template <typename T>
constexpr size_t simt_gemv_smem_bytes(int m_tile) { return static_cast<size_t>(m_tile) * kChunk * sizeof(T); }
// The shrink kernel's grid: a block per (rank index, row of x).
inline dim3 shrink_grid(int64_t r, int64_t M) { return dim3(static_cast<unsigned>(r), static_cast<unsigned>(M)); }

// The shrink kernel h = x A^T (r > 0; rank 0 launches nothing) and the SIMT decode GEMV on raw
// pointers: the launch sequences of nf4_gemv_lora.cu, shared with the CPU emulation (LK_LAUNCH).
// x [M, K] rows stride_xm apart, A [r, K], h [M, r], B [N, r], bias fp32 [N] or null, y [M, N].
template <typename T, typename TA>
void launch_shrink(const T* x, int64_t M, int64_t K, int64_t stride_xm, const TA* A, TA* h, int64_t r,
                   cudaStream_t stream) {
  if (r == 0) return;
  auto shrink_kernel = lora_shrink_kernel<T, TA>;
  LK_LAUNCH(shrink_kernel, shrink_grid(r, M), dim3(kThreads), 0, stream, x, A, h, K, r, stride_xm);
}
template <typename T, typename TA>
void launch_simt_gemv(const T* x, int64_t M, int64_t K, int64_t stride_xm, const NF4Args& q, bool dq, const TA* h,
                      const TA* B, int64_t N, int64_t r, const float* bias, float scale, T* y, cudaStream_t stream) {
  const bool vector_path = simt_vector_path(K, q.packed);
  with_m_tile(M, [&](auto tile) {
    constexpr int M_TILE = decltype(tile)::value;
    constexpr size_t smem = simt_gemv_smem_bytes<T>(M_TILE);
    auto gemv_kernel = simt_gemv_kernel<T, TA, M_TILE>(dq, q.stored == stored_kind<T>());
    if (smem > 48 * 1024) LK_ALLOW_DYNAMIC_SHARED(gemv_kernel, smem);
    LK_LAUNCH(gemv_kernel, simt_gemv_grid(N, M_TILE), dim3(kThreads), smem, stream, x, q, h, B, bias, y, M, N, K, r,
              stride_xm, scale, vector_path);
  });
}

template <typename T>
auto slab_kernel(bool dq, bool stored_is_x) {
  return dq ? (stored_is_x ? nf4_dequantize_slab_kernel<T, true, true> : nf4_dequantize_slab_kernel<T, true, false>)
            : (stored_is_x ? nf4_dequantize_slab_kernel<T, false, true> : nf4_dequantize_slab_kernel<T, false, false>);
}
// rows x cols8 threads' work (8 values each): threads along columns, blocks along rows up to the
// grid's y limit (the kernel strides over the rest).
inline dim3 slab_grid(int64_t rows, int64_t cols8) {
  return dim3(static_cast<unsigned>((cols8 + kThreads - 1) / kThreads), static_cast<unsigned>(rows < 65535 ? rows : 65535));
}
// W[n0:n0 + rows, k0:k0 + 8 cols8] decoded into out [rows, 8 cols8] (contiguous): nf4_gemv_lora.cu's
// launch, shared with the emulation.
template <typename T>
void launch_dequantize_slab(const NF4Args& q, bool dq, T* out, int64_t K, int64_t n0, int64_t k0, int64_t rows,
                            int64_t cols8, cudaStream_t stream) {
  auto decode_kernel = slab_kernel<T>(dq, q.stored == stored_kind<T>());
  LK_LAUNCH(decode_kernel, slab_grid(rows, cols8), dim3(kThreads), 0, stream, q, out, K, n0, k0, rows, cols8);
}

}  // namespace lora_kernels
