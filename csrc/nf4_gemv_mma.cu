// Launcher of the tensor-core NF4 decode GEMV (the op lora_kernels::nf4_gemv_lora with kernel = 1;
// the kernel and its design notes: nf4_gemv_mma_kernel.cuh; the op's entry point: nf4_gemv_lora.cu).
#include "nf4_gemv_mma_launch.cuh"

namespace lora_kernels {

// Compiled in nf4_gemv_mma_*.cu, in parallel with this file.
LK_MMA_GEMV_LAUNCHER(extern)

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
