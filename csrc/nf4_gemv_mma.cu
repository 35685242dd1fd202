// Launcher of the tensor-core NF4 decode GEMV (the op lora_kernels::nf4_gemv_lora with kernel = 1;
// the kernel and its design notes: nf4_gemv_mma_kernel.cuh; the op's entry point: nf4_gemv_lora.cu).
#include "nf4_gemv.cuh"
#include "nf4_gemv_mma_kernel.cuh"

#include <atomic>

namespace lora_kernels {
namespace {

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

}  // namespace

int nf4_gemv_mma_min_shared_bytes() { return mma_smem_bytes(2); }

void launch_nf4_gemv_mma(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& h, const at::Tensor& B,
                         const float* bias, at::Tensor& y, float scale, bool after_shrink, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), N = B.size(0), r = B.size(1);
  const bool fp32_adapters = h.scalar_type() == at::kFloat;
  auto launch = [&](auto t, auto ta) {
    launch_mma<decltype(t), decltype(ta)>(x, q, dq, h, B, bias, y, M, N, K, r, scale, after_shrink, stream);
  };
  if (x.scalar_type() == at::kHalf) {
    if (fp32_adapters) launch(__half(), float());
    else launch(__half(), __half());
  } else {
    if (fp32_adapters) launch(__nv_bfloat16(), float());
    else launch(__nv_bfloat16(), __nv_bfloat16());
  }
}

}  // namespace lora_kernels
