// Device code shared by every kernel of csrc/: the NF4 weight's arguments, dtype conversions and the
// programmatic-dependent-launch helpers. No ATen, no host API: the kernel headers that include it
// (nf4_gemv_kernels.cuh, nf4_gemv_mma_kernel.cuh) are also compiled by a host C++ compiler with
// LORA_KERNELS_EMULATION defined, which runs the same kernels on a CPU in the tests
// (csrc/emulation/: the few hardware operations below have an emulated branch there).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

// A kernel's dynamic shared memory, as `unsigned char name[]` (16-byte aligned).
#ifdef LORA_KERNELS_EMULATION
#define LK_DYNAMIC_SHARED(name) unsigned char* const name = ::lora_kernels::emulation::dynamic_shared()
#else
#define LK_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// A kernel launch from host code shared with the emulation: kernel<<<grid, block, smem, stream>>>(...)
// on CUDA (the caller checks the launch), run to completion in the emulation (the first error is
// kept: emulation::take_launch_error). `kernel` must be a plain name (a macro argument cannot hold a
// template argument list's commas).
#ifdef LORA_KERNELS_EMULATION
#define LK_LAUNCH(kernel, grid, block, smem, stream, ...)                                           \
  do {                                                                                               \
    (void)(stream);                                                                                  \
    ::lora_kernels::emulation::launch_or_keep_error(#kernel, kernel, grid, block, smem, __VA_ARGS__); \
  } while (0)
#else
#define LK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
// Lets `kernel` take `bytes` of dynamic shared memory above the default 48 KiB (before its launch; on
// CUDA an error shows at the caller's launch check). The emulation has no such limit.
#ifdef LORA_KERNELS_EMULATION
#define LK_ALLOW_DYNAMIC_SHARED(kernel, bytes) ((void)(kernel), (void)(bytes))
#else
#define LK_ALLOW_DYNAMIC_SHARED(kernel, bytes) \
  ((void)cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
#endif

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
template <typename T> constexpr int stored_kind();
template <> constexpr int stored_kind<__half>() { return kFloat16; }
template <> constexpr int stored_kind<__nv_bfloat16>() { return kBFloat16; }
template <> constexpr int stored_kind<float>() { return kFloat32; }

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
// are no-ops before sm_90, where the GEMV is launched without the attribute (plain stream order),
// and in the emulation, which runs launches one after the other.
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

}  // namespace lora_kernels
