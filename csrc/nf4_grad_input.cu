// The op lora_kernels::nf4_grad_input: dX = dY dequant(Q) + init for M <= 64 rows of dY (the QLoRA
// backward's base product at small M). The kernels and their design: nf4_grad_input_kernels.cuh.
#include "nf4_gemv.cuh"
#include "nf4_grad_input_instances.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace lora_kernels {

// Compiled in nf4_grad_input_*.cu, in parallel with this file.
LK_GRAD_INPUT_LAUNCHER(extern)

// grad_y [M, N] (unit stride along N; fp32, fp16 or bf16), the NF4 weight [N, K], init: fp32 [M, K]
// contiguous or undefined. Returns dx [M, K] in grad_y's dtype. Checks are in Python
// (lora_kernels/ops/nf4_gemv.py: use_cuda_grad_input); the TORCH_CHECKs guard direct calls.
at::Tensor nf4_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& absmax_code,
                               const c10::optional<at::Tensor>& absmax_scale,
                               const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code,
                               const c10::optional<at::Tensor>& init, int64_t K, int64_t blocksize,
                               int64_t nested_blocksize, at::ScalarType weight_dtype) {
  TORCH_CHECK(grad_y.is_cuda() && grad_y.dim() == 2 && grad_y.stride(1) == 1,
              "nf4_grad_input: grad_y must be a CUDA [M, N] tensor with unit stride along N");
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  TORCH_CHECK(M <= 64, "nf4_grad_input: at most 64 rows, got ", M);
  TORCH_CHECK(K % 8 == 0 && blocksize >= 8 && (blocksize & (blocksize - 1)) == 0 && packed.is_contiguous() &&
                  absmax.is_contiguous() && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0,
              "nf4_grad_input: needs K % 8 == 0, a power-of-two blocksize >= 8 and contiguous, 4-byte aligned codes, "
              "got K=", K, ", blocksize=", blocksize);
  const bool dq = absmax.scalar_type() == at::kByte;
  check_nf4_weight("nf4_grad_input", grad_y.device(), packed, absmax, absmax_code, absmax_scale, absmax_offset, code,
                   N, K, blocksize, nested_blocksize, weight_dtype);
  const bool has_init = init && init->defined();
  TORCH_CHECK(!has_init || (init->scalar_type() == at::kFloat && init->is_contiguous() && init->dim() == 2 &&
                            init->size(0) == M && init->size(1) == K && init->device() == grad_y.device()),
              "nf4_grad_input: init must be a contiguous float32 [M, K] tensor on grad_y's device");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  at::Tensor dx = at::empty({M, K}, grad_y.options());
  if (M == 0 || K == 0) return dx;
  if (N == 0) return has_init ? init->to(grad_y.scalar_type()) : dx.zero_();
  const NF4Args q = nf4_args(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, blocksize,
                             nested_blocksize, weight_dtype);
  const GradSplits sp = grad_input_splits(N, K, device_attribute(cudaDevAttrMultiProcessorCount));
  at::Tensor partial = at::empty({sp.splits * (M < kGradMaxTile ? M : kGradMaxTile) * K}, grad_y.options().dtype(at::kFloat));
  const float* init_ptr = has_init ? init->data_ptr<float>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto t) {
    using T = decltype(t);
    launch_grad_input<T>(reinterpret_cast<const T*>(grad_y.data_ptr()), M, N, grad_y.stride(0), q, dq, K, init_ptr,
                         reinterpret_cast<T*>(dx.data_ptr()), dx.stride(0), partial.data_ptr<float>(), sp, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (grad_y.scalar_type() == at::kHalf) run(__half());
  else if (grad_y.scalar_type() == at::kBFloat16) run(__nv_bfloat16());
  else if (grad_y.scalar_type() == at::kFloat) run(float());
  else TORCH_CHECK(false, "nf4_grad_input: grad_y must be float32, float16 or bfloat16, got ", grad_y.scalar_type());
  return dx;
}

}  // namespace lora_kernels
