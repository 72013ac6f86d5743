// CUDA registrations of the sideways ops: the convolutions through the ATen path
// (cuDNN), the weight update through the fused implicit-GEMM kernel of
// weight_update.cu wherever it applies (fp32 master weights, fp32/fp16/bf16
// activations), else the ATen path. Built only when torch has CUDA; no c10/cuda
// headers needed (the current stream comes from c10::Stream::native_handle()).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../aten_ops.h"
#include "../checks.h"
#include "weight_update.h"

namespace sideways {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

bool fused_applies(const at::Tensor& param, const c10::optional<at::Tensor>& buf,
                   const at::Tensor& ring, const at::Tensor& grad_out) {
  const auto t = ring.scalar_type();
  return param.scalar_type() == at::kFloat && param.is_contiguous() &&
         (!buf.has_value() || (buf->scalar_type() == at::kFloat && buf->is_contiguous())) &&
         (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && grad_out.scalar_type() == t;
}

cuda::DType dtype_of(at::ScalarType t) {
  return t == at::kHalf ? cuda::DType::kFloat16
                        : t == at::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat32;
}

cuda::WeightUpdateArgs make_args(const RingConv& g, int64_t slot, const at::Tensor& ring,
                                 const at::Tensor& grad_out) {
  cuda::WeightUpdateArgs a{};
  a.span = g.span;
  a.batch = g.batch;
  a.channels = g.channels;
  a.height = g.height;
  a.width = g.width;
  a.out_channels = g.out_channels;
  a.k_t = g.k_t;
  a.k_h = g.k_h;
  a.k_w = g.k_w;
  a.out_height = g.out_height;
  a.out_width = g.out_width;
  a.stride_h = g.stride[0];
  a.stride_w = g.stride[1];
  a.pad_h = g.padding[0];
  a.pad_w = g.padding[1];
  a.dil_h = g.dilation[0];
  a.dil_w = g.dilation[1];
  a.dil_t = g.dilation_t;
  a.groups = g.groups;
  a.slot = slot;
  for (int i = 0; i < 5; ++i) a.ring_strides[i] = ring.stride(i);
  for (int i = 0; i < 4; ++i) a.grad_strides[i] = grad_out.stride(i);
  return a;
}

void launch(const cuda::WeightUpdateArgs& a, const at::Tensor& grad_out, const at::Tensor& ring) {
  const c10::DeviceGuard guard(ring.device());
  const cudaError_t err = cuda::weight_update(a, dtype_of(ring.scalar_type()), grad_out.const_data_ptr(),
                                              ring.const_data_ptr(), current_stream(ring.device()));
  TORCH_CHECK(err == cudaSuccess, "sideways weight_update kernel launch failed: ", cudaGetErrorString(err));
}

void weight_grad_accumulate_cuda(at::Tensor grad_weight, const c10::optional<at::Tensor>& grad_bias,
                                 const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t dilation_t, int64_t groups) {
  auto g = check_weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                        dilation, dilation_t, groups);
  if (!fused_applies(grad_weight, c10::nullopt, ring, grad_out)) {
    return weight_grad_accumulate_aten(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                       dilation, dilation_t, groups);
  }
  auto a = make_args(g, slot, ring, grad_out);
  a.mode = cuda::WeightUpdateMode::kAccumulate;
  a.grad_weight = grad_weight.data_ptr<float>();
  launch(a, grad_out, ring);
  if (grad_bias.has_value()) {
    grad_bias->add_(grad_out.sum({0, 2, 3}, false, grad_bias->scalar_type()));
  }
}

void sgd_tick_update_cuda(at::Tensor weight, const c10::optional<at::Tensor>& momentum_buffer,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& bias_momentum_buffer,
                          const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t dilation_t, int64_t groups, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool first_step) {
  auto g = check_sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring,
                                 slot, stride, padding, dilation, dilation_t, groups, lr, momentum,
                                 dampening, weight_decay, nesterov);
  const auto buf = momentum != 0 ? momentum_buffer : c10::nullopt;
  if (!fused_applies(weight, buf, ring, grad_out)) {
    return sgd_tick_update_aten(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring,
                                slot, stride, padding, dilation, dilation_t, groups, lr, momentum,
                                dampening, weight_decay, nesterov, first_step);
  }
  auto a = make_args(g, slot, ring, grad_out);
  a.mode = cuda::WeightUpdateMode::kSgd;
  a.weight = weight.data_ptr<float>();
  a.momentum_buffer = buf.has_value() ? buf->data_ptr<float>() : nullptr;
  a.lr = static_cast<float>(lr);
  a.momentum = static_cast<float>(momentum);
  a.dampening = static_cast<float>(dampening);
  a.weight_decay = static_cast<float>(weight_decay);
  a.nesterov = nesterov;
  a.first_step = first_step;
  launch(a, grad_out, ring);
  if (bias.has_value()) {
    const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, first_step};
    sgd_apply(*bias, momentum != 0 ? bias_momentum_buffer : c10::nullopt,
              grad_out.sum({0, 2, 3}, false, bias->scalar_type()), h);
  }
}

}  // namespace
}  // namespace sideways

TORCH_LIBRARY_IMPL(sideways, CUDA, m) {
  m.impl("ring_conv_forward", &sideways::ring_conv_forward_aten);
  m.impl("window_input_grad", &sideways::window_input_grad_aten);
  m.impl("weight_grad_accumulate", &sideways::weight_grad_accumulate_cuda);
  m.impl("sgd_tick_update", &sideways::sgd_tick_update_cuda);
}
