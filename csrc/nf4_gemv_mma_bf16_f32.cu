// The tensor-core decode GEMV launcher for x __nv_bfloat16 and adapters float, with its kernel instances
// (nf4_gemv_mma_launch.cuh says why each pair has a file of its own).
#include "nf4_gemv_mma_launch.cuh"

namespace lora_kernels {
LK_MMA_GEMV_INSTANCE(, __nv_bfloat16, float)
}  // namespace lora_kernels
