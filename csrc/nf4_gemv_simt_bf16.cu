// The SIMT decode GEMV launcher for x __nv_bfloat16 and adapters __nv_bfloat16, with its kernel instances
// (nf4_gemv_simt_instances.cuh says why each pair has a file of its own).
#include "nf4_gemv_simt_instances.cuh"

namespace lora_kernels {
LK_SIMT_GEMV_INSTANCE(, __nv_bfloat16, __nv_bfloat16)
}  // namespace lora_kernels
