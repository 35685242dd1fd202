// The small-M dX launcher's instances, one per dY dtype, each compiled in a translation unit of its own
// (nf4_grad_input_<dtype>.cu): 16 kernel instances each (4 row tiles x double quantization x stored
// dtype), which in one file were one of the longest compiles of the build (nvcc compiles a file
// serially; the build compiles files in parallel). nf4_grad_input.cu declares them extern.
#pragma once
#include "nf4_grad_input_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The launch_grad_input<T> instance, defined (prefix empty) or declared (prefix extern).
#define LK_GRAD_INPUT_INSTANCE(prefix, T)                                                                   \
  prefix template void launch_grad_input<T>(const T*, int64_t, int64_t, int64_t, const NF4Args&, bool, int64_t, \
                                            const float*, T*, int64_t, float*, GradSplits, cudaStream_t);
// Every dtype nf4_grad_input.cu launches.
#define LK_GRAD_INPUT_LAUNCHER(prefix)            \
  LK_GRAD_INPUT_INSTANCE(prefix, __half)          \
  LK_GRAD_INPUT_INSTANCE(prefix, __nv_bfloat16)   \
  LK_GRAD_INPUT_INSTANCE(prefix, float)
