// Host-side interface of the fused weight-update kernel (no torch, no CUDA
// types beyond cudaStream_t), shared by the .cu file and its torch binding.
#pragma once
#include "cuda_compat.h"

#include <cstdint>

namespace sideways {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };
enum class WeightUpdateMode { kAccumulate, kSgd };

// ring [span, B, C, H, W] and grad_out [B, C_out, H_out, W_out] in `dtype`, any strides
// (in elements); weight, grad_weight and momentum_buffer are contiguous fp32
// [C_out, C/groups, k_t, k_h, k_w].
struct WeightUpdateArgs {
  int64_t span, batch, channels, height, width;
  int64_t out_channels, k_t, k_h, k_w, out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups, slot;
  int64_t ring_strides[5], grad_strides[4];
  WeightUpdateMode mode;
  float* grad_weight;      // kAccumulate: grad_weight += grad
  float* weight;           // kSgd: weight -= lr * step(grad)
  float* momentum_buffer;  // kSgd, null when momentum == 0
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

cudaError_t weight_update(const WeightUpdateArgs& args, DType dtype, const void* grad_out,
                          const void* ring, cudaStream_t stream);

}  // namespace cuda
}  // namespace sideways
