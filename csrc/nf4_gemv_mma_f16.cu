// The tensor-core decode GEMV launcher for x __half and adapters __half, with its kernel instances
// (nf4_gemv_mma_launch.cuh says why each pair has a file of its own).
#include "nf4_gemv_mma_launch.cuh"

namespace lora_kernels {
LK_MMA_GEMV_INSTANCE(, __half, __half)
}  // namespace lora_kernels
