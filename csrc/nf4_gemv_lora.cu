// The ops lora_kernels::nf4_gemv_lora (NF4 decode GEMV with the LoRA term fused, M <= 16 rows) and
// lora_kernels::nf4_dequantize_slab (bit-exact slab decode for the large-M route): entry points and
// launchers. The kernels, and what they do, are in nf4_gemv_kernels.cuh (shrink, SIMT GEMV, slab
// decode) and nf4_gemv_mma_kernel.cuh (tensor-core GEMV, launched from nf4_gemv_mma.cu); the SIMT
// GEMV's instances are compiled in nf4_gemv_simt_*.cu.
#include "nf4_gemv.cuh"
#include "nf4_gemv_kernels.cuh"
#include "nf4_gemv_simt_instances.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace lora_kernels {

// Compiled in nf4_gemv_simt_*.cu, in parallel with this file.
LK_SIMT_GEMV_LAUNCHER(extern)

namespace {

// The shrink kernel (r > 0; rank 0 is the benchmark's baseline for the LoRA term's cost), then the
// decode GEMV: the sequence the CPU emulation (csrc/emulation/harness.cpp) launches too.
template <typename T, typename TA>
void run(const at::Tensor& x, const NF4Args& q, bool dq, const at::Tensor& A, const at::Tensor& B,
         const float* bias, at::Tensor& y, at::Tensor& h, double scale, bool tensor_cores) {
  const int64_t M = x.size(0), K = x.size(1), N = B.size(0), r = B.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* x_ptr = reinterpret_cast<const T*>(x.data_ptr());
  launch_shrink<T, TA>(x_ptr, M, K, x.stride(0), reinterpret_cast<const TA*>(A.data_ptr()),
                       reinterpret_cast<TA*>(h.data_ptr()), r, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float s = static_cast<float>(scale);
  if (tensor_cores) {
    launch_nf4_gemv_mma(x, q, dq, h, B, bias, y, s, /*after_shrink=*/r > 0, stream);
    return;
  }
  launch_simt_gemv<T, TA>(x_ptr, M, K, x.stride(0), q, dq, reinterpret_cast<const TA*>(h.data_ptr()),
                          reinterpret_cast<const TA*>(B.data_ptr()), N, r, bias, s,
                          reinterpret_cast<T*>(y.data_ptr()), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

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

void check_nf4_weight(const char* op, const at::Device& device, const at::Tensor& packed, const at::Tensor& absmax,
                      const c10::optional<at::Tensor>& absmax_code, const c10::optional<at::Tensor>& absmax_scale,
                      const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& code, int64_t N, int64_t K,
                      int64_t blocksize, int64_t nested_blocksize, at::ScalarType weight_dtype) {
  TORCH_CHECK(N >= 0 && K >= 0 && blocksize >= 1, op, ": bad weight shape [", N, ", ", K, "] or blocksize ", blocksize);
  const int64_t numel = N * K, blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.device() == device && absmax.device() == device && code.device() == device, op,
              ": packed, absmax and code must be on ", device);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() >= (numel + 1) / 2, op, ": packed must be uint8 with ",
              (numel + 1) / 2, " codes for a [", N, ", ", K, "] weight, got ", packed.scalar_type(), " with ",
              packed.numel());
  const bool dq = absmax.scalar_type() == at::kByte;
  TORCH_CHECK((dq || absmax.scalar_type() == at::kFloat) && absmax.numel() >= blocks, op,
              ": absmax must be float32 (or uint8, double-quantized) with ", blocks, " entries, got ",
              absmax.scalar_type(), " with ", absmax.numel());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() >= 16, op,
              ": code must be a contiguous float32 table of 16 values");
  if (dq) {
    TORCH_CHECK(absmax_code && absmax_scale && absmax_offset && nested_blocksize >= 1 &&
                    (nested_blocksize & (nested_blocksize - 1)) == 0,
                op, ": double quantization needs its tables and a power-of-two nested_blocksize, got ",
                nested_blocksize);
    const int64_t nested = (blocks + nested_blocksize - 1) / nested_blocksize;
    for (const at::Tensor* t : {&*absmax_code, &*absmax_scale, &*absmax_offset}) {
      TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->is_contiguous(), op,
                  ": absmax_code, absmax_scale and absmax_offset must be contiguous float32 tensors on ", device);
    }
    TORCH_CHECK(absmax_code->numel() >= 256 && absmax_scale->numel() >= nested && absmax_offset->numel() >= 1, op,
                ": double quantization needs 256 absmax codes, ", nested, " scales and an offset");
  }
  TORCH_CHECK(weight_dtype == at::kHalf || weight_dtype == at::kBFloat16 || weight_dtype == at::kFloat, op,
              ": weight_dtype must be float16, bfloat16 or float32, got ", weight_dtype);
}

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
  const int64_t M = x.size(0), K = x.size(1), N = lora_B.size(0), r = lora_B.size(1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2 && lora_A.size(0) == r && lora_A.size(1) == K,
              "nf4_gemv_lora: lora_A must be [r, K] = [", r, ", ", K, "] and lora_B [N, r], got ", lora_A.sizes(),
              " and ", lora_B.sizes());
  TORCH_CHECK((lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat) &&
                  lora_B.scalar_type() == lora_A.scalar_type(),
              "nf4_gemv_lora: lora_A and lora_B must both be x's dtype or float32, got ", lora_A.scalar_type(), " and ",
              lora_B.scalar_type(), " with x ", x.scalar_type());
  TORCH_CHECK(lora_A.device() == x.device() && lora_B.device() == x.device(),
              "nf4_gemv_lora: lora_A and lora_B must be on x's device ", x.device());
  TORCH_CHECK(!(bias && bias->defined()) || (bias->device() == x.device() && bias->numel() == N),
              "nf4_gemv_lora: bias must have N = ", N, " values on x's device ", x.device());
  check_nf4_weight("nf4_gemv_lora", x.device(), packed, absmax, absmax_code, absmax_scale, absmax_offset, code, N, K,
                   blocksize, nested_blocksize, weight_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor h = at::empty({M, r}, lora_A.options());
  if (M == 0 || N == 0) return {y, h};
  at::Tensor bias32;
  if (bias && bias->defined()) bias32 = bias->to(at::kFloat).contiguous();
  const NF4Args q = nf4_args(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, blocksize,
                             nested_blocksize, weight_dtype);
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
    run<decltype(t), decltype(ta)>(x, q, dq, lora_A, lora_B, bias_ptr, y, h, scale, tensor_cores);
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
  check_nf4_weight("nf4_dequantize_slab", packed.device(), packed, absmax, absmax_code, absmax_scale, absmax_offset,
                   code, N, K, blocksize, nested_blocksize, weight_dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({n1 - n0, k1 - k0}, packed.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const NF4Args q = nf4_args(packed, absmax, absmax_code, absmax_scale, absmax_offset, code, blocksize,
                             nested_blocksize, weight_dtype);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto t) {
    using T = decltype(t);
    launch_dequantize_slab<T>(q, dq, reinterpret_cast<T*>(out.data_ptr()), K, n0, k0, out.size(0), out.size(1) / 8,
                              stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (out_dtype == at::kHalf) run(__half());
  else if (out_dtype == at::kBFloat16) run(__nv_bfloat16());
  else if (out_dtype == at::kFloat) run(float());
  else TORCH_CHECK(false, "nf4_dequantize_slab: out_dtype must be float16, bfloat16 or float32, got ", out_dtype);
  return out;
}

}  // namespace lora_kernels
