// The small-M dX launcher for dY __nv_bfloat16, with its kernel instances (nf4_grad_input_instances.cuh
// says why each dtype has a file of its own).
#include "nf4_grad_input_instances.cuh"

namespace lora_kernels {
LK_GRAD_INPUT_INSTANCE(, __nv_bfloat16)
}  // namespace lora_kernels
