// The QLoRA backward's base product at small M: dX = dY dequant(Q) (+ init, the LoRA term the Triton
// dX kernel wrote in fp32 with its dropout mask), for M <= 64 rows of dY [M, N] (the op
// lora_kernels::nf4_grad_input; launcher in nf4_grad_input.cu). Device code only: the CPU emulation
// (csrc/emulation/) runs these kernels too.
//
// Why: at small M the product is bound by the weight's bytes, like the forward GEMV, but the Triton
// dX kernel has one program per (row block of dY, 64 columns of W): 128 programs for K = 8192, each
// walking all N rows of W, so most SMs idle (measured on an H200: the whole backward ~3.7 ms at M = 1
// on 8192 x 28672, where bitsandbytes' decode + cuBLAS take about a millisecond).
//
// Decomposition: a block of 8 warps owns 256 columns of W (8 consecutive columns per lane: one
// 32-bit word of codes, inside one quantization block) and a contiguous range of rows (a split);
// its warps take the range's rows in turn (warp w: rows w, w + 8, ...), so that a warp reads 128
// contiguous bytes of a row per step and the 8 warps 8 consecutive rows. Each weight is decoded
// bit-exactly as dequantize_4bit does (rounded to the stored dtype, then to dY's dtype: the Triton
// dX kernel's operand) and multiplied by dY[m, n] (staged in shared memory per chunk of rows) for
// every row of the tile (M_TILE <= 8: 8 x M_TILE fp32 accumulators per thread). The 8 warps' sums are
// added in shared memory in warp order and written as the split's fp32 partial [M, 256 columns]; a
// second kernel adds the splits' partials in split order to init and rounds once to dY's dtype:
// deterministic, no atomics. Splits: enough blocks for about three per SM.
#pragma once
#include "nf4_gemv_kernels.cuh"  // decode, block_absmax, stored_kind

namespace lora_kernels {

constexpr int kGradThreads = 256;  // 8 warps
constexpr int kGradWarps = kGradThreads / 32;
constexpr int kGradCols = kGradThreads / kGradWarps * 8;  // 256 columns per block: 8 per lane
constexpr int kGradMaxTile = 8;                            // rows of dY per launch
constexpr int kGradRowChunk = 512;                         // rows of dY staged in shared memory at a time

constexpr int kGradUnroll = 4;                             // rows of W per lane whose loads fly together

// acc[m][j] += W[n, col + j] * dy[m, n] for the 8 weights of one 32-bit word of codes (one block scale).
template <typename T, int M_TILE, bool STORED_IS_X>
__device__ __forceinline__ void accumulate_row(float (&acc)[M_TILE][8], uint32_t word, float absmax, const float* nf4_s,
                                               int stored, const float (*dy_s)[kGradRowChunk], int n) {
  float w[8];
#pragma unroll
  for (int b = 0; b < 4; ++b) {  // byte b holds values 2b (high nibble) and 2b + 1
    const uint32_t byte = (word >> (8 * b)) & 0xffu;
    w[2 * b] = decode<T, STORED_IS_X>(nf4_s, byte >> 4, absmax, stored);
    w[2 * b + 1] = decode<T, STORED_IS_X>(nf4_s, byte & 0xfu, absmax, stored);
  }
#pragma unroll
  for (int m = 0; m < M_TILE; ++m) {
    const float g = dy_s[m][n];  // one address for the whole warp: a broadcast
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] += w[j] * g;
  }
}

template <typename T, int M_TILE, bool DQ, bool STORED_IS_X>
__global__ void __launch_bounds__(kGradThreads)
nf4_grad_input_partial_kernel(const T* __restrict__ dy, NF4Args q, float* __restrict__ partial, int64_t M,
                              int64_t N, int64_t K, int64_t stride_dym, int64_t rows_per_split) {
  __shared__ float nf4_s[16];
  __shared__ float code2_s[256];
  __shared__ float dy_s[M_TILE][kGradRowChunk];
  __shared__ float red_s[M_TILE][kGradCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < 16) nf4_s[threadIdx.x] = q.code[threadIdx.x];
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += kGradThreads) code2_s[i] = q.absmax_code[i];
  }
  const float offset = DQ ? *q.absmax_offset : 0.f;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGradCols + lane * 8;  // this lane's 8 columns
  const bool active = col < K;  // K % 8 == 0: a lane's columns are all in or all out
  const int64_t split = blockIdx.y;
  const int64_t n_begin = split * rows_per_split;
  const int64_t n_end = n_begin + rows_per_split < N ? n_begin + rows_per_split : N;

  float acc[M_TILE][8];
#pragma unroll
  for (int m = 0; m < M_TILE; ++m) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.f;
  }
  for (int64_t c0 = n_begin; c0 < n_end; c0 += kGradRowChunk) {
    const int rows = static_cast<int>(n_end - c0 < kGradRowChunk ? n_end - c0 : kGradRowChunk);
    __syncthreads();  // the previous chunk is consumed (and, first time, the tables are written)
    for (int i = threadIdx.x; i < M_TILE * kGradRowChunk; i += kGradThreads) {
      const int m = i / kGradRowChunk, n = i % kGradRowChunk;
      dy_s[m][n] = (m < M && n < rows) ? to_float<T>(dy[m * stride_dym + c0 + n]) : 0.f;
    }
    __syncthreads();
    if (!active) continue;  // no early return: the warp still takes part in the barriers
    // kGradUnroll rows per step, all their loads issued first: one 4-byte load in flight per thread
    // would wait a memory latency per row (the shrink kernel's measured lesson).
    int n = warp;
    for (; n + (kGradUnroll - 1) * kGradWarps < rows; n += kGradUnroll * kGradWarps) {
      uint32_t word[kGradUnroll];
      float absmax[kGradUnroll];
#pragma unroll
      for (int u = 0; u < kGradUnroll; ++u) {
        const int64_t e = (c0 + n + u * kGradWarps) * K + col;  // flat index of the 8 values: a multiple of 8
        word[u] = __ldg(reinterpret_cast<const uint32_t*>(q.packed + (e >> 1)));
        absmax[u] = block_absmax<DQ>(q, code2_s, e >> q.log2_blocksize, offset);
      }
#pragma unroll
      for (int u = 0; u < kGradUnroll; ++u) {
        accumulate_row<T, M_TILE, STORED_IS_X>(acc, word[u], absmax[u], nf4_s, q.stored, dy_s, n + u * kGradWarps);
      }
    }
    for (; n < rows; n += kGradWarps) {
      const int64_t e = (c0 + n) * K + col;
      accumulate_row<T, M_TILE, STORED_IS_X>(acc, __ldg(reinterpret_cast<const uint32_t*>(q.packed + (e >> 1))),
                                             block_absmax<DQ>(q, code2_s, e >> q.log2_blocksize, offset), nf4_s,
                                             q.stored, dy_s, n);
    }
  }
  // The 8 warps' sums, added in warp order (deterministic), then the split's partial.
  for (int w = 0; w < kGradWarps; ++w) {
    __syncthreads();
    if (warp == w) {
#pragma unroll
      for (int m = 0; m < M_TILE; ++m) {
#pragma unroll
        for (int j = 0; j < 8; ++j) red_s[m][lane * 8 + j] = (w == 0 ? 0.f : red_s[m][lane * 8 + j]) + acc[m][j];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < M_TILE * kGradCols; i += kGradThreads) {
    const int m = i / kGradCols, c = i % kGradCols;
    const int64_t k = static_cast<int64_t>(blockIdx.x) * kGradCols + c;
    if (m < M && k < K) partial[(split * M + m) * K + k] = red_s[m][c];
  }
}

// dx[m, k] = init[m, k] (or 0) + sum over splits of partial[s, m, k], in split order, rounded once.
template <typename T>
__global__ void __launch_bounds__(kGradThreads)
nf4_grad_input_finalize_kernel(const float* __restrict__ partial, const float* __restrict__ init, T* __restrict__ dx,
                               int64_t M, int64_t K, int64_t splits, int64_t stride_dxm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kGradThreads + threadIdx.x;
  if (i >= M * K) return;
  float v = init != nullptr ? init[i] : 0.f;
  for (int64_t s = 0; s < splits; ++s) v += partial[s * M * K + i];
  dx[(i / K) * stride_dxm + i % K] = from_float<T>(v);
}

// ---- instances and launch geometry (host side, shared with the emulation)

// Calls f(std::integral_constant<int, M_TILE>()) with the smallest tile of 1, 2, 4 or 8 rows that
// holds min(M, 8) rows (more rows run in launches of 8).
template <typename F>
void with_grad_tile(int64_t M, F&& f) {
  if (M <= 1) f(std::integral_constant<int, 1>());
  else if (M <= 2) f(std::integral_constant<int, 2>());
  else if (M <= 4) f(std::integral_constant<int, 4>());
  else f(std::integral_constant<int, 8>());
}
template <typename T, int M_TILE>
auto grad_input_partial_kernel(bool dq, bool stored_is_x) {
  return dq ? (stored_is_x ? nf4_grad_input_partial_kernel<T, M_TILE, true, true>
                           : nf4_grad_input_partial_kernel<T, M_TILE, true, false>)
            : (stored_is_x ? nf4_grad_input_partial_kernel<T, M_TILE, false, true>
                           : nf4_grad_input_partial_kernel<T, M_TILE, false, false>);
}
// Splits of the N rows: about three blocks per SM over all column blocks (each thread keeps 4 loads
// in flight: ~12 KiB per SM), at least 64 rows per split (a multiple of the 8 warps).
struct GradSplits {
  int64_t splits, rows_per_split;
};
inline GradSplits grad_input_splits(int64_t N, int64_t K, int64_t sms) {
  const int64_t col_blocks = (K + kGradCols - 1) / kGradCols;
  int64_t splits = (3 * sms + col_blocks - 1) / col_blocks;
  const int64_t max_splits = (N + 63) / 64;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  int64_t rows = (N + splits - 1) / splits;
  rows = (rows + kGradWarps - 1) / kGradWarps * kGradWarps;
  return {(N + rows - 1) / rows, rows};
}
inline dim3 grad_input_grid(int64_t K, int64_t splits) {
  return dim3(static_cast<unsigned>((K + kGradCols - 1) / kGradCols), static_cast<unsigned>(splits));
}
inline dim3 grad_input_finalize_grid(int64_t M, int64_t K) {
  return dim3(static_cast<unsigned>((M * K + kGradThreads - 1) / kGradThreads));
}

// The op on raw pointers, shared by the CUDA launcher (nf4_grad_input.cu) and the emulation: per
// chunk of 8 rows of dY, the partial kernel, then the finalize kernel (stream order: the partial
// buffer, splits * min(M, 8) * K floats, is reused by the next chunk). N >= 1.
template <typename T>
void launch_grad_input(const T* dy, int64_t M, int64_t N, int64_t stride_dym, const NF4Args& q, bool dq, int64_t K,
                       const float* init, T* dx, int64_t stride_dxm, float* partial, GradSplits sp,
                       cudaStream_t stream) {
  const bool same = q.stored == stored_kind<T>();
  for (int64_t m0 = 0; m0 < M; m0 += kGradMaxTile) {
    const int64_t rows = M - m0 < kGradMaxTile ? M - m0 : kGradMaxTile;
    with_grad_tile(rows, [&](auto tile) {
      auto partial_kernel = grad_input_partial_kernel<T, decltype(tile)::value>(dq, same);
      LK_LAUNCH(partial_kernel, grad_input_grid(K, sp.splits), dim3(kGradThreads), 0, stream, dy + m0 * stride_dym, q,
                partial, rows, N, K, stride_dym, sp.rows_per_split);
    });
    auto finalize_kernel = nf4_grad_input_finalize_kernel<T>;
    LK_LAUNCH(finalize_kernel, grad_input_finalize_grid(rows, K), dim3(kGradThreads), 0, stream,
              static_cast<const float*>(partial), init != nullptr ? init + m0 * K : nullptr, dx + m0 * stride_dxm, rows,
              K, sp.splits, stride_dxm);
  }
}

}  // namespace lora_kernels
