// The SIMT decode GEMV's launcher instances, one per (x dtype, adapter dtype) pair, each compiled in a
// translation unit of its own (nf4_gemv_simt_<x>_<adapters>.cu): every pair holds 20 kernel instances
// (5 row tiles x double quantization x stored dtype), and in one file they were the longest compile of
// the build by far (nvcc compiles a file serially; the build compiles files in parallel).
// nf4_gemv_lora.cu declares them extern (LK_SIMT_GEMV_LAUNCHER(extern)) so it instantiates none.
#pragma once
#include "nf4_gemv_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The launch_simt_gemv<T, TA> instance, defined (prefix empty) or declared (prefix extern).
#define LK_SIMT_GEMV_INSTANCE(prefix, T, TA)                                                                    \
  prefix template void launch_simt_gemv<T, TA>(const T*, int64_t, int64_t, int64_t, const NF4Args&, bool,     \
                                               const TA*, const TA*, int64_t, int64_t, const float*, float, T*, \
                                               cudaStream_t);
// Every pair nf4_gemv_lora.cu launches.
#define LK_SIMT_GEMV_LAUNCHER(prefix)                    \
  LK_SIMT_GEMV_INSTANCE(prefix, __half, __half)          \
  LK_SIMT_GEMV_INSTANCE(prefix, __half, float)           \
  LK_SIMT_GEMV_INSTANCE(prefix, __nv_bfloat16, __nv_bfloat16) \
  LK_SIMT_GEMV_INSTANCE(prefix, __nv_bfloat16, float)
