// Host-side interface of the CUDA kernels (no torch; CUDA types only through
// cuda_compat.h), shared by kernels.cu, its torch binding and the host emulation.
#pragma once
#include <cstdint>

#include "cuda_compat.h"

namespace sideways {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };
enum class WeightUpdateMode { kAccumulate, kSgd };

// One streaming conv layer. ring [span, B, C, H, W] and the layer's output-shaped tensor
// ([B, C_out, H_out, W_out]: grad_out, or the forward's out) in the activation dtype, any
// strides (in elements). Weights are contiguous fp32 [C_out, C/groups, k_t, k_h, k_w].
struct ConvGeometry {
  int64_t span, batch, channels, height, width;
  int64_t out_channels, k_t, k_h, k_w, out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups, slot;
  int64_t ring_strides[5], out_strides[4];
};

// Strides of the input gradient, passed to the kernel by value.
struct InStrides {
  int64_t s[4];
};

struct WeightUpdateArgs {
  ConvGeometry g;
  WeightUpdateMode mode;
  // Split-K (see plan_weight_update): split_k programs share each output tile, writing fp32
  // partials (split_k > 1 only) whose sum the last of them applies; counters, one per tile,
  // are zero on entry and left zero.
  int64_t split_k;
  float* partials;
  int* counters;
  float* grad_weight;      // kAccumulate: grad_weight += grad
  float* weight;           // kSgd: weight -= lr * step(grad)
  float* momentum_buffer;  // kSgd, null when momentum == 0
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

// How weight_update splits its reduction: the caller allocates partial_floats fp32 values and
// `counters` zeroed ints and passes them with split_k. split_k 0 picks the factor from the
// tile count and the device's SM count (one or two waves of blocks); a positive one is
// taken (clamped to the reduction's steps).
struct WeightUpdatePlan {
  int64_t split_k, partial_floats, counters;
};
cudaError_t plan_weight_update(const ConvGeometry& g, DType dtype, int64_t split_k, WeightUpdatePlan* plan);

// The weight gradient of one frame pair for every tap, kept in registers and either
// accumulated or applied as torch.optim.SGD's step (see WeightUpdateMode).
cudaError_t weight_update(const WeightUpdateArgs& args, DType dtype, const void* grad_out,
                          const void* ring, cudaStream_t stream);

// out = the conv of the window ending at g.slot (+ fp32 bias, may be null); out has
// g.out_strides. `weight` is in the activation dtype and the GEMM's layout: contiguous
// [C_out, k_t, k_h, k_w, C/groups] (the weight [C_out, C/groups, k_t, k_h, k_w] permuted).
cudaError_t ring_conv_forward(const ConvGeometry& g, DType dtype, const void* ring, const void* weight,
                              const float* bias, void* out, cudaStream_t stream);

// grad_in [B, C, H, W] (strides in_strides) = the transposed conv of grad_out (g.out_strides)
// with the taps' weights summed. `summed_weight` is in the activation dtype and the GEMM's
// layout: contiguous [groups, C/groups, k_h, k_w, C_out/groups] (the sum over k_t of the
// weight, [C_out, C/groups, k_h, k_w], viewed as [groups, C_out/groups, ...] and permuted).
cudaError_t window_input_grad(const ConvGeometry& g, DType dtype, const void* grad_out, const void* summed_weight,
                              void* grad_in, const int64_t* in_strides, cudaStream_t stream);

}  // namespace cuda
}  // namespace sideways
