// Shared by the two NF4 decode GEMVs of csrc/: nf4_gemv_lora.cu (the op's entry point, the shrink
// kernel h = x A^T and the SIMT decode GEMV) and nf4_gemv_mma.cu (the tensor-core decode GEMV):
// the NF4 weight's arguments, dtype conversions, programmatic-dependent-launch helpers, and the
// tensor-core GEMV's launcher. Two translation units, so that nvcc compiles them in parallel.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lora_kernels {

constexpr int kMaxRank = 64;  // h lives in shared memory (lora_kernels/ops/nf4_gemv.py: GEMV_MAX_RANK)

enum StoredDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
struct NF4Args {
  const uint8_t* packed;
  const void* absmax;          // float [n_blocks], or uint8 [n_blocks] with double quantization
  const float* absmax_code;    // [256] or nullptr
  const float* absmax_scale;   // [ceil(n_blocks / nested_blocksize)] or nullptr
  const float* absmax_offset;  // 0-d or nullptr
  const float* code;           // [16]
  // log2 of the block sizes (powers of two, as all of bitsandbytes'): block indices by shifts, not
  // 64-bit divisions (a division is a subroutine call whose saved registers spill to the stack).
  int log2_blocksize;
  int log2_nested_blocksize;
  int stored;
};
// Programmatic dependent launch (sm_90): the shrink kernel lets the GEMV launched after it start at
// once; the GEMV streams its weight and waits for the shrink kernel's h only in its epilogue. Both
// are no-ops before sm_90, where the GEMV is launched without the attribute (plain stream order).
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// A device attribute of the current device (the driver answers from its cache: no device round trip).
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}
// The tensor-core decode GEMV (nf4_gemv_mma.cu), for the op's kernel = 1: y = x dequant(Q)^T +
// scale * h B^T + bias with h [M, r] already computed (by the shrink kernel launched just before it
// when after_shrink: on sm_90 the GEMV then starts while it runs, and waits for h in its epilogue).
// Eligibility (K % 256 == 0, blocksize 64, alignment, sm_80+, shared memory) is checked by the caller.
void launch_nf4_gemv_mma(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& h, const at::Tensor& B,
                         const float* bias, at::Tensor& y, float scale, bool after_shrink, cudaStream_t stream);
// Shared memory per block the tensor-core GEMV needs at least (its ring at two stages).
int nf4_gemv_mma_min_shared_bytes();

}  // namespace lora_kernels
