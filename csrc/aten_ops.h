// The sideways ops written with ATen calls, for any device (see aten_ops.cpp).
// Backend files register them (cpu/) or use them beside their own kernels (cuda/).
#pragma once
#include <ATen/ATen.h>

namespace sideways {

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

at::Tensor ring_conv_forward_aten(at::Tensor ring, const c10::optional<at::Tensor>& frame,
                                  int64_t slot, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t dilation_t, int64_t groups);

at::Tensor window_input_grad_aten(const at::Tensor& grad_out, const at::Tensor& weight,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

void weight_grad_accumulate_aten(at::Tensor grad_weight, const c10::optional<at::Tensor>& grad_bias,
                                 const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t dilation_t, int64_t groups);

void sgd_tick_update_aten(at::Tensor weight, const c10::optional<at::Tensor>& momentum_buffer,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& bias_momentum_buffer,
                          const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t dilation_t, int64_t groups, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool first_step);

// A tensor a kernel wrote in place gets a new version, as after ATen's in-place ops: autograd's
// saved-tensor check and the CUDA binding's cache of the 16-bit weight rely on it. The ops run
// below the key where ATen bumps versions, and kernels writing through pointers bump nothing (on
// an H100 a fused SGD step left the cached cast stale: the next forward ran on the old weight).
inline void mark_written(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// torch.optim.SGD's update of `param` by `grad` (any strides; one fused pass on CPU), which
// marks `param` and `buf` written.
void sgd_apply(at::Tensor param, const c10::optional<at::Tensor>& buf, const at::Tensor& grad,
               const SgdHyper& h);

}  // namespace sideways
