// CUDA registrations of the sideways ops: the hand-written kernels of kernels.cu for
// fp32/fp16/bf16 activations (weights and gradient buffers fp32 master copies for the
// fused update), else the ATen path (cuDNN). Built only when torch has CUDA; needs no
// c10/cuda headers (the current stream comes from c10::Stream::native_handle()).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "../aten_ops.h"
#include "../checks.h"
#include "kernels.h"

namespace sideways {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

cuda::DType dtype_of(at::ScalarType t) {
  return t == at::kHalf ? cuda::DType::kFloat16
                        : t == at::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat32;
}

// `ring` may be undefined (window_input_grad reads no ring): its strides are then 0.
cuda::ConvGeometry geometry(const RingConv& g, int64_t slot, const at::Tensor& ring,
                            const at::Tensor& out_shaped) {
  cuda::ConvGeometry c{};
  c.span = g.span;
  c.batch = g.batch;
  c.channels = g.channels;
  c.height = g.height;
  c.width = g.width;
  c.out_channels = g.out_channels;
  c.k_t = g.k_t;
  c.k_h = g.k_h;
  c.k_w = g.k_w;
  c.out_height = g.out_height;
  c.out_width = g.out_width;
  c.stride_h = g.stride[0];
  c.stride_w = g.stride[1];
  c.pad_h = g.padding[0];
  c.pad_w = g.padding[1];
  c.dil_h = g.dilation[0];
  c.dil_w = g.dilation[1];
  c.dil_t = g.dilation_t;
  c.groups = g.groups;
  c.slot = slot;
  for (int i = 0; i < 5; ++i) c.ring_strides[i] = ring.defined() ? ring.stride(i) : 0;
  for (int i = 0; i < 4; ++i) c.out_strides[i] = out_shaped.stride(i);
  return c;
}

// The weights as the kernels' GEMMs read them (kernels.h): rounded to the activations' type as
// autocast rounds the fp32 masters, each output row dense along the reduction, so that they
// load as 16-byte copies. Made once per version of the weight (below).
at::Tensor make_gemm_weight(const at::Tensor& weight, at::ScalarType activations) {
  return weight.to(activations).permute({0, 2, 3, 4, 1}).contiguous();  // [C_out, k_t, k_h, k_w, C/groups]
}

at::Tensor make_gemm_summed_weight(const at::Tensor& weight, at::ScalarType activations, int64_t groups) {
  const auto summed = weight.sum(2, false, at::kFloat);  // [C_out, C/groups, k_h, k_w], summed in fp32
  return summed.view({groups, summed.size(0) / groups, summed.size(1), summed.size(2), summed.size(3)})
      .permute({0, 2, 3, 4, 1})  // [groups, C/groups, k_h, k_w, C_out/groups]
      .to(activations)
      .contiguous();
}

// What the ops derive from a weight (its cast, its taps' sum), kept while the weight is the
// same tensor at the same version: every in-place change (an optimizer step, the fused SGD op
// through mark_written) bumps the version, and the weak pointer keeps a freed weight's
// TensorImpl from being taken for a new one at its address. While a CUDA graph is being
// captured the derivation is always recorded, so that a replay derives it from the weight as
// it is then.
struct Derived {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
  int64_t version;
  at::ScalarType dtype;
  int64_t groups;  // -1: the cast; else the taps' sum for that many groups
  at::Tensor value;
};

at::Tensor derived_weight(const at::Tensor& weight, at::ScalarType activations, int64_t groups) {
  auto make = [&] {
    return groups < 0 ? make_gemm_weight(weight, activations) : make_gemm_summed_weight(weight, activations, groups);
  };
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(current_stream(weight.device()), &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone) {
    return make();
  }
  if (weight.is_view()) return make();  // a clip edge's live taps: a new view every call, nothing to reuse
  static std::mutex mutex;
  static std::unordered_map<const void*, std::vector<Derived>> cache;  // TensorImpl -> its derivations
  std::lock_guard<std::mutex> lock(mutex);
  const void* key = weight.unsafeGetTensorImpl();
  auto& entries = cache[key];
  for (auto it = entries.begin(); it != entries.end(); ++it) {
    if (it->dtype == activations && it->groups == groups) {
      if (!it->source.expired() && it->version == weight._version()) return it->value;
      entries.erase(it);
      break;
    }
  }
  // forget the weights that are gone, at every insertion (a few dozen entries): a dead weight's
  // copy would otherwise hold device memory until the cache grew past a bound
  for (auto it = cache.begin(); it != cache.end();) {
    const bool gone = it->second.empty() || it->second.front().source.expired();
    it = gone && it->first != key ? cache.erase(it) : std::next(it);
  }
  at::Tensor value = make();
  entries.push_back({c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr()),
                     weight._version(), activations, groups, value});
  return value;
}

at::Tensor gemm_weight(const at::Tensor& weight, at::ScalarType activations) {
  return derived_weight(weight, activations, -1);
}

at::Tensor gemm_summed_weight(const at::Tensor& weight, at::ScalarType activations, int64_t groups) {
  return derived_weight(weight, activations, groups);
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "sideways ", kernel, ": the input is too large for one launch "
              "on this device (batch*height*width, channels per group or groups beyond its grid limits)");
  TORCH_CHECK(err == cudaSuccess, "sideways ", kernel, " kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor ring_conv_forward_cuda(at::Tensor ring, const c10::optional<at::Tensor>& frame, int64_t slot,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t dilation_t, int64_t groups) {
  if (!kernel_dtype(ring.scalar_type())) {
    return ring_conv_forward_aten(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t,
                                  groups);
  }
  auto g = check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups);
  if (bias.has_value()) check_bias(*bias, "bias", g, ring);
  if (frame.has_value()) {
    check_frame(*frame, ring);
    ring.select(0, slot).copy_(*frame);
  }
  const c10::DeviceGuard guard(ring.device());
  const auto w = gemm_weight(weight, ring.scalar_type());
  const auto b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({g.batch, g.out_channels, g.out_height, g.out_width},
                       ring.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_launch(cuda::ring_conv_forward(geometry(g, slot, ring, out), dtype_of(ring.scalar_type()),
                                       ring.const_data_ptr(), w.const_data_ptr(),
                                       b32.defined() ? b32.const_data_ptr<float>() : nullptr,
                                       out.mutable_data_ptr(), current_stream(ring.device())),
               "ring_conv_forward");
  return out;
}

at::Tensor window_input_grad_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!kernel_dtype(grad_out.scalar_type())) {
    return window_input_grad_aten(grad_out, weight, input_size, stride, padding, dilation, groups);
  }
  const auto g = geometry(
      check_window_input_grad(grad_out, weight, input_size, stride, padding, dilation, groups), 0,
      at::Tensor(), grad_out);
  const c10::DeviceGuard guard(grad_out.device());
  const auto summed = gemm_summed_weight(weight, grad_out.scalar_type(), groups);
  auto grad_in = at::empty({g.batch, g.channels, g.height, g.width},
                           grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_launch(cuda::window_input_grad(g, dtype_of(grad_out.scalar_type()), grad_out.const_data_ptr(),
                                       summed.const_data_ptr(), grad_in.mutable_data_ptr(),
                                       grad_in.strides().data(), current_stream(grad_out.device())),
               "window_input_grad");
  return grad_in;
}

bool fused_applies(const at::Tensor& param, const c10::optional<at::Tensor>& buf, const at::Tensor& ring) {
  return param.scalar_type() == at::kFloat && param.is_contiguous() &&
         (!buf.has_value() || (buf->scalar_type() == at::kFloat && buf->is_contiguous())) &&
         kernel_dtype(ring.scalar_type());
}

// The fused weight-update kernel with `a`'s mode and buffers, on this ring and error.
void launch_weight_update(cuda::WeightUpdateArgs a, const RingConv& g, int64_t slot, const at::Tensor& ring,
                          const at::Tensor& grad_out) {
  const c10::DeviceGuard guard(ring.device());
  a.g = geometry(g, slot, ring, grad_out);
  cuda::WeightUpdatePlan plan{};
  check_launch(cuda::plan_weight_update(a.g, dtype_of(ring.scalar_type()), 0, &plan), "weight_update");
  at::Tensor partials, counters;  // split-K workspace, from the caching allocator (and a graph's pool)
  if (plan.split_k > 1) {
    partials = at::empty({plan.partial_floats}, ring.options().dtype(at::kFloat));
    counters = at::zeros({plan.counters}, ring.options().dtype(at::kInt));
  }
  a.split_k = plan.split_k;
  a.partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  a.counters = counters.defined() ? counters.data_ptr<int>() : nullptr;
  check_launch(cuda::weight_update(a, dtype_of(ring.scalar_type()), grad_out.const_data_ptr(),
                                   ring.const_data_ptr(), current_stream(ring.device())),
               "weight_update");
}

void weight_grad_accumulate_cuda(at::Tensor grad_weight, const c10::optional<at::Tensor>& grad_bias,
                                 const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t dilation_t, int64_t groups) {
  auto g = check_weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                        dilation, dilation_t, groups);
  if (!fused_applies(grad_weight, c10::nullopt, ring)) {
    return weight_grad_accumulate_aten(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                       dilation, dilation_t, groups);
  }
  cuda::WeightUpdateArgs a{};
  a.mode = cuda::WeightUpdateMode::kAccumulate;
  a.grad_weight = grad_weight.data_ptr<float>();
  launch_weight_update(a, g, slot, ring, grad_out);
  mark_written(grad_weight);
  if (grad_bias.has_value()) {
    grad_bias->add_(grad_out.sum({0, 2, 3}, false, grad_bias->scalar_type()));
    mark_written(*grad_bias);
  }
}

void sgd_tick_update_cuda(at::Tensor weight, const c10::optional<at::Tensor>& momentum_buffer,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& bias_momentum_buffer, const at::Tensor& grad_out,
                          const at::Tensor& ring, int64_t slot, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t dilation_t, int64_t groups, double lr,
                          double momentum, double dampening, double weight_decay, bool nesterov,
                          bool first_step) {
  auto g = check_sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot,
                                 stride, padding, dilation, dilation_t, groups, lr, momentum, dampening,
                                 weight_decay, nesterov);
  const auto buf = momentum != 0 ? momentum_buffer : c10::nullopt;
  if (!fused_applies(weight, buf, ring)) {
    return sgd_tick_update_aten(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot,
                                stride, padding, dilation, dilation_t, groups, lr, momentum, dampening,
                                weight_decay, nesterov, first_step);
  }
  cuda::WeightUpdateArgs a{};
  a.mode = cuda::WeightUpdateMode::kSgd;
  a.weight = weight.data_ptr<float>();
  a.momentum_buffer = buf.has_value() ? buf->data_ptr<float>() : nullptr;
  a.lr = static_cast<float>(lr);
  a.momentum = static_cast<float>(momentum);
  a.dampening = static_cast<float>(dampening);
  a.weight_decay = static_cast<float>(weight_decay);
  a.nesterov = nesterov;
  a.first_step = first_step;
  launch_weight_update(a, g, slot, ring, grad_out);
  mark_written(weight);
  if (buf.has_value()) mark_written(*buf);
  if (bias.has_value()) {
    const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, first_step};
    sgd_apply(*bias, momentum != 0 ? bias_momentum_buffer : c10::nullopt,
              grad_out.sum({0, 2, 3}, false, bias->scalar_type()), h);
  }
}

}  // namespace
}  // namespace sideways

TORCH_LIBRARY_IMPL(sideways, CUDA, m) {
  m.impl("ring_conv_forward", &sideways::ring_conv_forward_cuda);
  m.impl("window_input_grad", &sideways::window_input_grad_cuda);
  m.impl("weight_grad_accumulate", &sideways::weight_grad_accumulate_cuda);
  m.impl("sgd_tick_update", &sideways::sgd_tick_update_cuda);
}
