// The tensor-core decode GEMV's launcher (the op's entry point: nf4_gemv_lora.cu, through
// launch_nf4_gemv_mma in nf4_gemv_mma.cu), and its instances, one per (x dtype, adapter dtype) pair,
// each compiled in a translation unit of its own (nf4_gemv_mma_<x>_<adapters>.cu): 8 kernel instances
// each (row tiles x double quantization x ring depth), which in one file were one of the longest
// compiles of the build (nvcc compiles a file serially; the build compiles files in parallel).
#pragma once
#include "nf4_gemv.cuh"
#include "nf4_gemv_mma_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

namespace lora_kernels {

template <typename T, typename TA>
void launch_mma(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& h, const at::Tensor& B,
                const float* bias, at::Tensor& y, int64_t M, int64_t N, int64_t K, int64_t r, float scale,
                bool after_shrink, cudaStream_t stream) {
  const int stages = mma_stages(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  with_mma_kernel<T, TA>(M, dq, stages, [&](auto tag, int smem) {
    constexpr auto kernel = decltype(tag)::kernel;
    static std::atomic<uint64_t> configured{0};  // per instance: a bit per device it was allowed on
    const int device = c10::cuda::current_device();
    const uint64_t bit = uint64_t{1} << (device & 63);
    if (device >= 64 || !(configured.load() & bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      configured.fetch_or(bit);
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = mma_grid(N, device_attribute(cudaDevAttrMultiProcessorCount));
    config.blockDim = dim3(kMmaThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    // Only right after our own shrink kernel (which reads x, writes only h, and started after x's
    // producer finished): the GEMV reads x before its grid-dependency wait.
    config.attrs = attribute;
    config.numAttrs = (after_shrink && device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9) ? 1 : 0;
    // With the dependent launch, the LoRA term is deferred to the kernel's tail (its design notes):
    // base sums of the whole output wait in an fp32 scratch buffer.
    at::Tensor pending;
    if (config.numAttrs == 1) pending = at::empty({mma_pending_floats(N)}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, reinterpret_cast<const T*>(x.data_ptr()), q,
                                      reinterpret_cast<const TA*>(h.data_ptr()),
                                      reinterpret_cast<const TA*>(B.data_ptr()), bias,
                                      reinterpret_cast<T*>(y.data_ptr()),
                                      pending.defined() ? pending.data_ptr<float>() : nullptr, static_cast<int>(M),
                                      N, K, static_cast<int>(r), x.stride(0), scale));
  });
}


}  // namespace lora_kernels

// The launch_mma<T, TA> instance, defined (prefix empty) or declared (prefix extern).
#define LK_MMA_GEMV_INSTANCE(prefix, T, TA)                                                                    \
  prefix template void launch_mma<T, TA>(const at::Tensor&, const NF4Args&, bool, const at::Tensor&,          \
                                         const at::Tensor&, const float*, at::Tensor&, int64_t, int64_t, int64_t, \
                                         int64_t, float, bool, cudaStream_t);
// Every pair launch_nf4_gemv_mma launches.
#define LK_MMA_GEMV_LAUNCHER(prefix)                           \
  LK_MMA_GEMV_INSTANCE(prefix, __half, __half)                 \
  LK_MMA_GEMV_INSTANCE(prefix, __half, float)                  \
  LK_MMA_GEMV_INSTANCE(prefix, __nv_bfloat16, __nv_bfloat16)   \
  LK_MMA_GEMV_INSTANCE(prefix, __nv_bfloat16, float)
