// The small-M dX launcher for dY float, with its kernel instances (nf4_grad_input_instances.cuh
// says why each dtype has a file of its own).
#include "nf4_grad_input_instances.cuh"

namespace lora_kernels {
LK_GRAD_INPUT_INSTANCE(, float)
}  // namespace lora_kernels
