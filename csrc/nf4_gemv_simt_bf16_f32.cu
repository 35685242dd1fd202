// The SIMT decode GEMV launcher for x __nv_bfloat16 and adapters float, with its kernel instances
// (nf4_gemv_simt_instances.cuh says why each pair has a file of its own).
#include "nf4_gemv_simt_instances.cuh"

namespace lora_kernels {
LK_SIMT_GEMV_INSTANCE(, __nv_bfloat16, float)
}  // namespace lora_kernels
