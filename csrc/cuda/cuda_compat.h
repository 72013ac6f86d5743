// The CUDA headers a kernel file needs, or their host emulation (SIDEWAYS_EMULATE), and
// the launch macro both understand.
#pragma once
#ifdef SIDEWAYS_EMULATE
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#ifdef __CUDACC__
#include <cuda_pipeline.h>  // the kernels' cp.async primitives
#endif
#define SIDEWAYS_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define SIDEWAYS_UNROLL _Pragma("unroll")
#define SIDEWAYS_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif
