// Registers the CUDA kernels of csrc/ as the CUDA implementations of ops whose schemas are declared
// once, in Python (lora_kernels/ops/nf4_gemv.py: torch.library.define), before this library loads.
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>

namespace lora_kernels {
std::tuple<at::Tensor, at::Tensor> nf4_gemv_lora_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& absmax_code, const c10::optional<at::Tensor>& absmax_scale,
    const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias, double scale, int64_t blocksize,
    int64_t nested_blocksize, at::ScalarType weight_dtype, int64_t kernel);
at::Tensor nf4_dequantize_slab_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                    const c10::optional<at::Tensor>& absmax_code,
                                    const c10::optional<at::Tensor>& absmax_scale,
                                    const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, int64_t N,
                                    int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1, int64_t blocksize,
                                    int64_t nested_blocksize, at::ScalarType weight_dtype, at::ScalarType out_dtype);
at::Tensor nf4_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& absmax_code,
                               const c10::optional<at::Tensor>& absmax_scale,
                               const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code,
                               const c10::optional<at::Tensor>& init, int64_t K, int64_t blocksize,
                               int64_t nested_blocksize, at::ScalarType weight_dtype);
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("nf4_gemv_lora", &lora_kernels::nf4_gemv_lora_cuda);
  m.impl("nf4_dequantize_slab", &lora_kernels::nf4_dequantize_slab_cuda);
  m.impl("nf4_grad_input", &lora_kernels::nf4_grad_input_cuda);
}

#ifndef LORA_KERNELS_CUDA_ARCHS
#error "build with -DLORA_KERNELS_CUDA_ARCHS=<architectures joined by _> (csrc/build_flags.py: archs_define)"
#endif
#define LORA_KERNELS_STRINGIFY_(x) #x
#define LORA_KERNELS_STRINGIFY(x) LORA_KERNELS_STRINGIFY_(x)

// An importable module (lora_kernels._C) whose import runs the registration above; cuda_archs: the
// architectures the kernels were compiled for ("80_90"), read by lora_kernels/ops/nf4_gemv.py.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels CUDA kernels (registered as torch.ops.lora_kernels.*)";
  m.attr("cuda_archs") = LORA_KERNELS_STRINGIFY(LORA_KERNELS_CUDA_ARCHS);
}
