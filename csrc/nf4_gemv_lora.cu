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
//  kernel 1, tensor cores (K % 256 == 0, blocksize 64, sm_80+): nf4_gemv_mma.cu.
#include "nf4_gemv.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace lora_kernels {
namespace {

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
template <typename T> constexpr int stored_kind();
template <> constexpr int stored_kind<__half>() { return kFloat16; }
template <> constexpr int stored_kind<__nv_bfloat16>() { return kBFloat16; }
template <> constexpr int stored_kind<float>() { return kFloat32; }

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
  extern __shared__ __align__(16) unsigned char smem_raw[];
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

  float acc[R][M_TILE];
#pragma unroll
  for (int j = 0; j < R; ++j) {
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) acc[j][m] = 0.f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t len = K - k0 < kChunk ? K - k0 : kChunk;
    __syncthreads();  // previous chunk consumed (and, first time, the tables written)
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

template <typename T, typename TA, int M_TILE>
void launch_gemv(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& h, const at::Tensor& B,
                 const float* bias, at::Tensor& y, int64_t M, int64_t N, int64_t K, int64_t r, float scale,
                 bool vector_path, cudaStream_t stream) {
  const int64_t rows_per_block = static_cast<int64_t>(kWarps) * rows_per_warp(M_TILE);
  const dim3 grid(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block));
  const size_t smem = static_cast<size_t>(M_TILE) * kChunk * sizeof(T);
  const bool same = q.stored == stored_kind<T>();
  auto kernel = dq ? (same ? nf4_gemv_lora_kernel<T, TA, M_TILE, true, true>
                           : nf4_gemv_lora_kernel<T, TA, M_TILE, true, false>)
                   : (same ? nf4_gemv_lora_kernel<T, TA, M_TILE, false, true>
                           : nf4_gemv_lora_kernel<T, TA, M_TILE, false, false>);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), q, reinterpret_cast<const TA*>(h.data_ptr()),
      reinterpret_cast<const TA*>(B.data_ptr()), bias, reinterpret_cast<T*>(y.data_ptr()), M, N, K, r,
      x.stride(0), scale, vector_path);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
template <typename T, typename TA>
void run(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& A, const at::Tensor& B,
         const float* bias, at::Tensor& y, at::Tensor& h, double scale, bool vector_path, bool tensor_cores) {
  const int64_t M = x.size(0), K = x.size(1), N = B.size(0), r = B.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (r > 0) {  // rank 0: the decode GEMV alone (the benchmark's baseline for the LoRA term's cost)
    lora_shrink_kernel<T, TA><<<dim3(static_cast<unsigned>(r), static_cast<unsigned>(M)), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const TA*>(A.data_ptr()),
        reinterpret_cast<TA*>(h.data_ptr()), K, r, x.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const float s = static_cast<float>(scale);
  if (tensor_cores) {
    launch_nf4_gemv_mma(x, q, dq, h, B, bias, y, s, /*after_shrink=*/r > 0, stream);
    return;
  }
  if (M <= 1) launch_gemv<T, TA, 1>(x, q, dq, h, B, bias, y, M, N, K, r, s, vector_path, stream);
  else if (M <= 2) launch_gemv<T, TA, 2>(x, q, dq, h, B, bias, y, M, N, K, r, s, vector_path, stream);
  else if (M <= 4) launch_gemv<T, TA, 4>(x, q, dq, h, B, bias, y, M, N, K, r, s, vector_path, stream);
  else if (M <= 8) launch_gemv<T, TA, 8>(x, q, dq, h, B, bias, y, M, N, K, r, s, vector_path, stream);
  else launch_gemv<T, TA, 16>(x, q, dq, h, B, bias, y, M, N, K, r, s, vector_path, stream);
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

template <typename T>
void launch_dequantize_slab(const NF4Args& q, bool dq, at::Tensor& out, int64_t K, int64_t n0, int64_t k0,
                            cudaStream_t stream) {
  const int64_t rows = out.size(0), cols8 = out.size(1) / 8;
  const dim3 grid(static_cast<unsigned>((cols8 + kThreads - 1) / kThreads),
                  static_cast<unsigned>(rows < 65535 ? rows : 65535));
  const bool same = q.stored == stored_kind<T>();
  auto kernel = dq ? (same ? nf4_dequantize_slab_kernel<T, true, true> : nf4_dequantize_slab_kernel<T, true, false>)
                   : (same ? nf4_dequantize_slab_kernel<T, false, true> : nf4_dequantize_slab_kernel<T, false, false>);
  kernel<<<grid, kThreads, 0, stream>>>(q, reinterpret_cast<T*>(out.data_ptr()), K, n0, k0, rows, cols8);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels' view of an NF4 weight (block sizes must be powers of two: checked by the callers).
NF4Args nf4_args(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax_code,
                 const c10::optional<at::Tensor>& absmax_scale, const c10::optional<at::Tensor>& absmax_offset,
                 const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, at::ScalarType weight_dtype) {
  const bool dq = absmax.scalar_type() == at::kByte;
  NF4Args q;
  q.packed = packed.data_ptr<uint8_t>();
  q.absmax = absmax.data_ptr();
  q.absmax_code = dq ? absmax_code->data_ptr<float>() : nullptr;
  q.absmax_scale = dq ? absmax_scale->data_ptr<float>() : nullptr;
  q.absmax_offset = dq ? absmax_offset->data_ptr<float>() : nullptr;
  q.code = code.data_ptr<float>();
  q.log2_blocksize = 63 - __builtin_clzll(static_cast<unsigned long long>(blocksize));
  q.log2_nested_blocksize = dq ? 63 - __builtin_clzll(static_cast<unsigned long long>(nested_blocksize)) : 0;
  q.stored = weight_dtype == at::kHalf ? kFloat16 : weight_dtype == at::kBFloat16 ? kBFloat16 : kFloat32;
  return q;
}

}  // namespace

// x [M, K] (unit stride along K), NF4 weight [N, K], lora_A [r, K], lora_B [N, r] contiguous;
// bias: combined bias (bias + scale * lora_B_bias) as fp32 [N], or undefined.
// Returns (y [M, N] in x's dtype, h [M, r] in the adapters' dtype). Checks are in Python
// (lora_kernels/ops/nf4_gemv.py); the TORCH_CHECKs here guard against direct calls.
std::tuple<at::Tensor, at::Tensor> nf4_gemv_lora_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& absmax_code, const c10::optional<at::Tensor>& absmax_scale,
    const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias, double scale, int64_t blocksize,
    int64_t nested_blocksize, at::ScalarType weight_dtype, int64_t kernel) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "nf4_gemv_lora: x must be a CUDA [M, K] tensor with unit stride along K");
  TORCH_CHECK(x.size(0) <= 16, "nf4_gemv_lora: at most 16 rows, got ", x.size(0));
  TORCH_CHECK(lora_B.size(1) <= kMaxRank, "nf4_gemv_lora: rank at most ", kMaxRank, ", got ", lora_B.size(1));
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
              "nf4_gemv_lora: blocksize must be a power of two >= 32, got ", blocksize);

  const bool dq = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(!dq || (nested_blocksize >= 1 && (nested_blocksize & (nested_blocksize - 1)) == 0),
              "nf4_gemv_lora: nested_blocksize must be a power of two, got ", nested_blocksize);
  TORCH_CHECK(!dq || (absmax_code && absmax_scale && absmax_offset), "nf4_gemv_lora: double quantization needs its tables");
  TORCH_CHECK(lora_A.is_contiguous() && lora_B.is_contiguous() && packed.is_contiguous() && absmax.is_contiguous(),
              "nf4_gemv_lora: lora_A, lora_B, packed and absmax must be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = lora_B.size(0), r = lora_B.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor h = at::empty({M, r}, lora_A.options());
  if (M == 0 || N == 0) return {y, h};
  at::Tensor bias32;
  if (bias && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  const NF4Args q = nf4_args(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, blocksize,
                             nested_blocksize, weight_dtype);
  const bool vector_path = K % 32 == 0 && reinterpret_cast<uintptr_t>(q.packed) % 16 == 0;
  TORCH_CHECK(kernel == 0 || kernel == 1, "nf4_gemv_lora: kernel must be 0 (SIMT) or 1 (tensor cores), got ", kernel);
  const bool tensor_cores = kernel == 1;
  if (tensor_cores) {  // the Python side only asks for it when all of this holds (ops/nf4_gemv.py)
    TORCH_CHECK(device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8,
                "nf4_gemv_lora: kernel 1 needs sm_80 or newer");
    TORCH_CHECK(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) >= nf4_gemv_mma_min_shared_bytes(),
                "nf4_gemv_lora: kernel 1 needs ", nf4_gemv_mma_min_shared_bytes(),
                " bytes of shared memory per block (A100/H100 class)");
    TORCH_CHECK(K % 256 == 0 && blocksize == 64 && (!dq || nested_blocksize >= 4) && N * K / 64 < (int64_t{1} << 31),
                "nf4_gemv_lora: kernel 1 needs K % 256 == 0, blocksize 64, nested_blocksize >= 4 and fewer than 2^31 "
                "blocks, got K=", K, ", blocksize=", blocksize, ", nested_blocksize=", nested_blocksize);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(q.packed) % 8 == 0 && reinterpret_cast<uintptr_t>(q.absmax) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % 8 == 0,
                "nf4_gemv_lora: kernel 1 needs 8-byte aligned packed codes, 16-byte aligned absmax and 16-byte "
                "aligned rows of x");
  }
  const float* bias_ptr = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const bool fp32_adapters = lora_A.scalar_type() == at::kFloat;
  auto dispatch = [&](auto t, auto ta) {  // x's dtype, the adapters' dtype
    run<decltype(t), decltype(ta)>(x, q, dq, lora_A, lora_B, bias_ptr, y, h, scale, vector_path, tensor_cores);
  };
  if (x.scalar_type() == at::kHalf) {
    if (fp32_adapters) dispatch(__half(), float());
    else dispatch(__half(), __half());
  } else if (x.scalar_type() == at::kBFloat16) {
    if (fp32_adapters) dispatch(__nv_bfloat16(), float());
    else dispatch(__nv_bfloat16(), __nv_bfloat16());
  } else {
    TORCH_CHECK(false, "nf4_gemv_lora: x must be float16 or bfloat16, got ", x.scalar_type());
  }
  return {y, h};
}

// W[n0:n1, k0:k1] of an NF4 weight [N, K] as a new contiguous [n1 - n0, k1 - k0] tensor in out_dtype
// (each value rounded to weight_dtype first, as dequantize_4bit(...).to(out_dtype)). Checks are in
// Python (lora_kernels/ops/nf4_gemv.py: use_cuda_slab_decode); the TORCH_CHECKs guard direct calls.
at::Tensor nf4_dequantize_slab_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                    const c10::optional<at::Tensor>& absmax_code,
                                    const c10::optional<at::Tensor>& absmax_scale,
                                    const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, int64_t N,
                                    int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1, int64_t blocksize,
                                    int64_t nested_blocksize, at::ScalarType weight_dtype,
                                    at::ScalarType out_dtype) {
  TORCH_CHECK(packed.is_cuda() && packed.is_contiguous() && absmax.is_contiguous(),
              "nf4_dequantize_slab: packed and absmax must be contiguous CUDA tensors");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && 0 <= k0 && k0 <= k1 && k1 <= K,
              "nf4_dequantize_slab: rows [", n0, ", ", n1, ") and columns [", k0, ", ", k1, ") must lie in [", N, ", ",
              K, "]");
  TORCH_CHECK(K % 8 == 0 && k0 % 8 == 0 && (k1 - k0) % 8 == 0 && blocksize >= 8 &&
                  (blocksize & (blocksize - 1)) == 0 && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0,
              "nf4_dequantize_slab: needs K, k0 and k1 - k0 multiples of 8, a power-of-two blocksize >= 8 and "
              "4-byte aligned codes, got K=", K, ", k0=", k0, ", k1=", k1, ", blocksize=", blocksize);
  const bool dq = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(!dq || (absmax_code && absmax_scale && absmax_offset && nested_blocksize >= 1 &&
                      (nested_blocksize & (nested_blocksize - 1)) == 0),
              "nf4_dequantize_slab: double quantization needs its tables and a power-of-two nested_blocksize");
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({n1 - n0, k1 - k0}, packed.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const NF4Args q = nf4_args(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, blocksize,
                             nested_blocksize, weight_dtype);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (out_dtype == at::kHalf) launch_dequantize_slab<__half>(q, dq, out, K, n0, k0, stream);
  else if (out_dtype == at::kBFloat16) launch_dequantize_slab<__nv_bfloat16>(q, dq, out, K, n0, k0, stream);
  else if (out_dtype == at::kFloat) launch_dequantize_slab<float>(q, dq, out, K, n0, k0, stream);
  else TORCH_CHECK(false, "nf4_dequantize_slab: out_dtype must be float16, bfloat16 or float32, got ", out_dtype);
  return out;
}

}  // namespace lora_kernels
