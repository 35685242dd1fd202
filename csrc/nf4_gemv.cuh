// Host-side code shared by the translation units of csrc/: nf4_gemv_lora.cu (the ops' entry points,
// the shrink / SIMT / slab launchers), nf4_gemv_mma.cu and nf4_gemv_mma_*.cu (the tensor-core GEMV's
// launcher and its instances), nf4_grad_input.cu. The kernels are in the *_kernel(s).cuh headers.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include "nf4_device.cuh"

namespace lora_kernels {

// A device attribute of the current device (the driver answers from its cache: no device round trip).
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}
// The kernels' view of an NF4 weight (nf4_gemv_lora.cu; block sizes powers of two: checked by the callers).
NF4Args nf4_args(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax_code,
                 const c10::optional<at::Tensor>& absmax_scale, const c10::optional<at::Tensor>& absmax_offset,
                 const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, at::ScalarType weight_dtype);
// TORCH_CHECKs of an op's NF4 weight tensors against the weight [N, K] they describe, for direct
// calls (the Python side builds them right; a wrong one would be read out of bounds): all on
// ``device``; packed uint8 with ceil(N*K/2) codes; absmax fp32, or uint8 with its fp32 tables
// (256 codes, one scale per nested block, an offset), one entry per block; the 16-entry fp32 code
// table; a stored dtype of fp16, bf16 or fp32. blocksize: a power of two, checked by the caller.
void check_nf4_weight(const char* op, const at::Device& device, const at::Tensor& packed, const at::Tensor& absmax,
                      const c10::optional<at::Tensor>& absmax_code, const c10::optional<at::Tensor>& absmax_scale,
                      const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, int64_t N, int64_t K,
                      int64_t blocksize, int64_t nested_blocksize, at::ScalarType weight_dtype);
// The tensor-core decode GEMV (nf4_gemv_mma.cu), for the op's kernel = 1: y = x dequant(Q)^T +
// scale * h B^T + bias with h [M, r] already computed (by the shrink kernel launched just before it
// when after_shrink: on sm_90 the GEMV then starts while it runs, and waits for h in its epilogue).
// Eligibility (K % 256 == 0, blocksize 64, alignment, sm_80+, shared memory) is checked by the caller.
void launch_nf4_gemv_mma(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& h, const at::Tensor& B,
                         const float* bias, at::Tensor& y, float scale, bool after_shrink, cudaStream_t stream);
// Shared memory per block the tensor-core GEMV needs at least (its ring at two stages).
int nf4_gemv_mma_min_shared_bytes();

}  // namespace lora_kernels
