// The SIMT decode GEMV launcher for x __half and adapters __half, with its kernel instances
// (nf4_gemv_simt_instances.cuh says why each pair has a file of its own).
#include "nf4_gemv_simt_instances.cuh"

namespace lora_kernels {
LK_SIMT_GEMV_INSTANCE(, __half, __half)
}  // namespace lora_kernels
