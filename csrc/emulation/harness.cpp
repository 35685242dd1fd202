// The kernels of csrc/ run by the CPU emulation (cuda_emulation.h), behind a C interface for ctypes:
// lora_kernels/tools/csrc_emulation.py builds this file with the host C++ compiler and calls it from
// the tests (tests/csrc/). The launches mirror the CUDA launchers (nf4_gemv_lora.cu, nf4_gemv_mma.cu):
// the same instances and launch geometry, from the helpers the kernel headers share with them.
#define LORA_KERNELS_EMULATION 1
#include "cuda_emulation.h"
// the kernel headers after the emulation
#include "../nf4_gemv_kernels.cuh"
#include "../nf4_gemv_mma_kernel.cuh"
#include "../nf4_grad_input_kernels.cuh"

#include <cmath>
#include <string>
#include <vector>

namespace {

using lora_kernels::NF4Args;
namespace emu = lora_kernels::emulation;

std::string last_error;

int report(const std::string& error) {
  last_error = error;
  return error.empty() ? 0 : 1;
}

// What the Python side passes for an NF4 weight (lora_kernels/tools/csrc_emulation.py: _NF4).
struct NF4Buffers {
  const uint8_t* packed;
  int64_t packed_bytes;
  const void* absmax;
  int64_t absmax_bytes;
  const float* absmax_code;  // [256] or null
  const float* absmax_scale;
  int64_t absmax_scale_count;
  const float* absmax_offset;
  const float* code;  // [16]
  int32_t log2_blocksize;
  int32_t log2_nested_blocksize;
  int32_t stored;
  int32_t double_quant;
};

NF4Args nf4_args(const NF4Buffers& b) {
  emu::allow_reads(b.packed, b.packed_bytes, "packed");
  emu::allow_reads(b.absmax, b.absmax_bytes, "absmax");
  emu::allow_reads(b.code, 16 * sizeof(float), "code");
  if (b.double_quant) {
    emu::allow_reads(b.absmax_code, 256 * sizeof(float), "absmax_code");
    emu::allow_reads(b.absmax_scale, b.absmax_scale_count * sizeof(float), "absmax_scale");
    emu::allow_reads(b.absmax_offset, sizeof(float), "absmax_offset");
  }
  NF4Args q;
  q.packed = b.packed;
  q.absmax = b.absmax;
  q.absmax_code = b.double_quant ? b.absmax_code : nullptr;
  q.absmax_scale = b.double_quant ? b.absmax_scale : nullptr;
  q.absmax_offset = b.double_quant ? b.absmax_offset : nullptr;
  q.code = b.code;
  q.log2_blocksize = b.log2_blocksize;
  q.log2_nested_blocksize = b.log2_nested_blocksize;
  q.stored = b.stored;
  return q;
}

// nf4_gemv_lora.cu's run(): the shrink kernel (r > 0), then the SIMT or the tensor-core GEMV.
template <typename T, typename TA>
std::string gemv(int kernel, const T* x, int64_t M, int64_t K, int64_t stride_xm, const NF4Args& q, bool dq,
                 const TA* A, const TA* B, int64_t N, int64_t r, const float* bias, float scale, T* y, TA* h, int sms,
                 int shared_optin, bool defer_lora) {
  using namespace lora_kernels;
  emu::allow_reads(x, ((M - 1) * stride_xm + K) * sizeof(T), "x");
  if (r > 0) emu::allow_reads(h, M * r * sizeof(TA), "h");  // the GEMV reads what the shrink kernel wrote
  launch_shrink<T, TA>(x, M, K, stride_xm, A, h, r, nullptr);
  std::string error = emu::take_launch_error();
  if (!error.empty()) return error;
  if (kernel != 1) {
    launch_simt_gemv<T, TA>(x, M, K, stride_xm, q, dq, h, B, N, r, bias, scale, y, nullptr);
    return emu::take_launch_error();
  }
  // the CUDA launcher defers the LoRA term after the shrink kernel on sm_90 (programmatic dependent
  // launch, which the emulation does not have: defer_lora stands for it); NaN until written
  std::vector<float> pending(defer_lora ? mma_pending_floats(N) : 0, NAN);
  with_mma_kernel<T, TA>(M, dq, mma_stages(shared_optin), [&](auto tag, int smem) {
    error = emu::launch(decltype(tag)::kernel, mma_grid(N, sms), dim3(kMmaThreads), smem, x, q,
                        static_cast<const TA*>(h), B, bias, y, defer_lora ? pending.data() : nullptr,
                        static_cast<int>(M), N, K, static_cast<int>(r), stride_xm, scale);
  });
  return error.empty() ? error : "nf4_gemv_mma_kernel: " + error;
}

// ---- kernels that check the emulation itself

template <typename T>
__global__ void mma_probe_kernel(const float* A, const float* B, float* D) {  // one warp: D = A (16x16) B (16x8)
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pair = [](float lo, float hi) {
    return lora_kernels::bits16<T>(lo) | (lora_kernels::bits16<T>(hi) << 16);
  };
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  lora_kernels::mma_16816<T>(c, pair(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                             pair(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                             pair(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                             pair(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]),
                             pair(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                             pair(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]));
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = c[i];
}
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 16) return;  // these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1.f;
}
__global__ void early_read_kernel(const float* in, float* out) {  // reads a cp.async destination before waiting
  LK_DYNAMIC_SHARED(smem);
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + threadIdx.x * 4;
  lora_kernels::cp_async<4>(base, in + threadIdx.x);
  lora_kernels::cp_async_commit();
  out[threadIdx.x] = __uint_as_float(lora_kernels::lds32(base));
  lora_kernels::cp_async_wait<0>();
}
__global__ void stray_load_kernel(const float* in, float* out) {  // reads one element past its input
  out[threadIdx.x] = __ldg(in + threadIdx.x + 1);
}

}  // namespace

extern "C" {

const char* lk_emulation_error() { return last_error.c_str(); }
// The order threads are resumed in from now on: 0 ascending, 1 descending, else a seeded shuffle.
void lk_emulation_set_schedule(uint64_t schedule) { emu::state().schedule = schedule; }

// The op lora_kernels::nf4_gemv_lora (kernel 0 SIMT, 1 tensor cores) on host memory: x [M, K] with row
// stride stride_xm, A [r, K], B [N, r] contiguous, bias fp32 [N] or null; writes y [M, N] and h [M, r].
// x_dtype and adapter_dtype: lora_kernels::StoredDtype. sms and shared_optin stand for the device's
// multiprocessor count and opt-in shared memory per block (they pick the grid and the ring depth);
// defer_lora: the tensor-core kernel defers its LoRA term to its tail, as after a dependent launch.
int lk_emulated_nf4_gemv(int kernel, int x_dtype, int adapter_dtype, const void* x, int64_t M, int64_t K,
                         int64_t stride_xm, const NF4Buffers* weight, const void* A, const void* B, int64_t N, int64_t r,
                         const float* bias, float scale, void* y, void* h, int sms, int shared_optin,
                         int defer_lora) {
  emu::state().readable.clear();
  const NF4Args q = nf4_args(*weight);
  const bool dq = weight->double_quant != 0;
  if (r > 0) {
    emu::allow_reads(A, r * K * (adapter_dtype == lora_kernels::kFloat32 ? 4 : 2), "lora_A");
    emu::allow_reads(B, N * r * (adapter_dtype == lora_kernels::kFloat32 ? 4 : 2), "lora_B");
  }
  if (bias != nullptr) emu::allow_reads(bias, N * sizeof(float), "bias");
  auto run = [&](auto t, auto ta) {
    using T = decltype(t);
    using TA = decltype(ta);
    return gemv<T, TA>(kernel, static_cast<const T*>(x), M, K, stride_xm, q, dq, static_cast<const TA*>(A),
                       static_cast<const TA*>(B), N, r, bias, scale, static_cast<T*>(y), static_cast<TA*>(h), sms,
                       shared_optin, defer_lora != 0);
  };
  const bool fp32_adapters = adapter_dtype == lora_kernels::kFloat32;
  if (x_dtype == lora_kernels::kFloat16) {
    return report(fp32_adapters ? run(__half(), float()) : run(__half(), __half()));
  }
  if (x_dtype == lora_kernels::kBFloat16) {
    return report(fp32_adapters ? run(__nv_bfloat16(), float()) : run(__nv_bfloat16(), __nv_bfloat16()));
  }
  return report("x_dtype must be float16 or bfloat16");
}

// The op lora_kernels::nf4_dequantize_slab: out [rows, cols] = W[n0 : n0 + rows, k0 : k0 + cols] in out_dtype.
int lk_emulated_nf4_dequantize_slab(int out_dtype, const NF4Buffers* weight, void* out, int64_t K, int64_t n0,
                                    int64_t k0, int64_t rows, int64_t cols) {
  emu::state().readable.clear();
  const NF4Args q = nf4_args(*weight);
  auto run = [&](auto t) {
    using T = decltype(t);
    lora_kernels::launch_dequantize_slab<T>(q, weight->double_quant != 0, static_cast<T*>(out), K, n0, k0, rows,
                                            cols / 8, nullptr);
    return emu::take_launch_error();
  };
  if (out_dtype == lora_kernels::kFloat16) return report(run(__half()));
  if (out_dtype == lora_kernels::kBFloat16) return report(run(__nv_bfloat16()));
  return report(run(float()));
}

// The op lora_kernels::nf4_grad_input: dx [M, K] = dy [M, N] (row stride stride_dym) dequant(W) + init
// (fp32 [M, K] or null), through the launcher the CUDA op uses (nf4_grad_input_kernels.cuh); sms
// stands for the multiprocessor count (it sets the splits). N >= 1.
int lk_emulated_nf4_grad_input(int dtype, const void* dy, int64_t M, int64_t N, int64_t stride_dym,
                               const NF4Buffers* weight, int64_t K, const float* init, void* dx, int sms) {
  using namespace lora_kernels;
  emu::state().readable.clear();
  const NF4Args q = nf4_args(*weight);
  const GradSplits sp = grad_input_splits(N, K, sms);
  std::vector<float> partial(sp.splits * (M < kGradMaxTile ? M : kGradMaxTile) * K, NAN);  // NaN until written
  auto run = [&](auto t) {
    using T = decltype(t);
    launch_grad_input<T>(static_cast<const T*>(dy), M, N, stride_dym, q, weight->double_quant != 0, K, init,
                         static_cast<T*>(dx), K, partial.data(), sp, nullptr);
    return emu::take_launch_error();
  };
  if (dtype == kFloat16) return report(run(__half()));
  if (dtype == kBFloat16) return report(run(__nv_bfloat16()));
  return report(run(float()));
}

// Checks of the emulation: one mma (A [16, 16], B [16, 8] row-major fp32, rounded to the 16-bit
// dtype; D [16, 8]), and three kernels that break a rule (probe 0: a divergent barrier, 1: a read of
// a cp.async destination before its wait, 2: an __ldg past its input): each must report an error.
int lk_emulated_mma(int bf16, const float* A, const float* B, float* D) {
  emu::state().readable.clear();
  const std::string error = bf16 ? emu::launch(mma_probe_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, A, B, D)
                                 : emu::launch(mma_probe_kernel<__half>, dim3(1), dim3(32), 0, A, B, D);
  return report(error);
}
int lk_emulated_rule_probe(int probe, const float* in, float* out) {  // in, out: 64 floats
  emu::state().readable.clear();
  emu::allow_reads(in, 32 * sizeof(float), "in");
  if (probe == 0) return report(emu::launch(divergent_barrier_kernel, dim3(1), dim3(32), 0, out));
  if (probe == 1) return report(emu::launch(early_read_kernel, dim3(1), dim3(32), 32 * 4, in, out));
  return report(emu::launch(stray_load_kernel, dim3(1), dim3(32), 0, in, out));
}

}  // extern "C"
