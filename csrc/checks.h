// Argument checks shared by every backend's torch binding (never included by
// the .cu kernel files, which see raw pointers only). Every failure is a
// TORCH_CHECK naming the argument and what was expected, so nonsense refused by
// the Python wrapper is refused by the op itself too.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace sideways {

// The geometry of one streaming Conv3d layer, derived from ring and weight.
struct RingConv {
  int64_t span, batch, channels, height, width;  // ring [span, B, C, H, W]
  int64_t out_channels, k_t, k_h, k_w;            // weight [C_out, C/groups, k_t, k_h, k_w]
  int64_t out_height, out_width;
  int64_t stride[2], padding[2], dilation[2], dilation_t, groups;

  // Ring slot read by temporal tap j when the newest frame sits in `slot`.
  int64_t tap_slot(int64_t slot, int64_t j) const {
    int64_t s = (slot - (k_t - 1 - j) * dilation_t) % span;
    return s < 0 ? s + span : s;
  }
};

// The part of a RingConv the (checked) weight and conv arguments give; the caller fills in
// the input's sizes.
inline RingConv weight_conv(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t dilation_t, int64_t groups) {
  RingConv g{};
  g.out_channels = weight.size(0);
  g.k_t = weight.size(2);
  g.k_h = weight.size(3);
  g.k_w = weight.size(4);
  for (int i = 0; i < 2; ++i) {
    g.stride[i] = stride[i];
    g.padding[i] = padding[i];
    g.dilation[i] = dilation[i];
  }
  g.dilation_t = dilation_t;
  g.groups = groups;
  return g;
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 entries (h, w), got ", v.size());
  for (auto x : v) {
    TORCH_CHECK(x >= min_value, name, " must be >= ", min_value, " in each entry, got ", v);
  }
}

inline bool is_low_precision(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// Parameters (weight, bias, their gradients and momenta) either share the
// activations' dtype or are float32 master copies of float16/bfloat16 activations.
inline void check_param_dtype(const at::Tensor& t, const char* name, at::ScalarType act) {
  TORCH_CHECK(t.scalar_type() == act || (is_low_precision(act) && t.scalar_type() == at::kFloat),
              name, " must have the activations' dtype ", act,
              (is_low_precision(act) ? " (or float32)" : ""), ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like ring, got ",
              t.device());
}

inline RingConv check_ring_conv(const at::Tensor& ring, int64_t slot, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t dilation_t, int64_t groups) {
  TORCH_CHECK(ring.dim() == 5, "ring must be 5-D [span, B, C, H, W], got shape ", ring.sizes());
  TORCH_CHECK(at::isFloatingType(ring.scalar_type()), "ring must be a floating tensor, got ",
              ring.scalar_type());
  TORCH_CHECK(weight.dim() == 5, "weight must be 5-D [C_out, C/groups, k_t, k_h, k_w], got shape ",
              weight.sizes());
  check_same_device(weight, "weight", ring);
  check_param_dtype(weight, "weight", ring.scalar_type());
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(dilation_t >= 1, "dilation_t must be >= 1, got ", dilation_t);
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);

  RingConv g = weight_conv(weight, stride, padding, dilation, dilation_t, groups);
  g.span = ring.size(0);
  g.batch = ring.size(1);
  g.channels = ring.size(2);
  g.height = ring.size(3);
  g.width = ring.size(4);

  TORCH_CHECK(g.span >= 1 && g.batch >= 1 && g.channels >= 1 && g.height >= 1 && g.width >= 1,
              "ring must have no empty dimension, got shape ", ring.sizes());
  TORCH_CHECK(g.out_channels >= 1 && g.k_t >= 1 && g.k_h >= 1 && g.k_w >= 1,
              "weight must have no empty dimension, got shape ", weight.sizes());
  TORCH_CHECK(g.channels % groups == 0, "groups (", groups, ") must divide the ring's channels (",
              g.channels, ")");
  TORCH_CHECK(g.out_channels % groups == 0, "groups (", groups,
              ") must divide weight.size(0) (", g.out_channels, ")");
  TORCH_CHECK(weight.size(1) * groups == g.channels, "weight.size(1) must be C/groups = ",
              g.channels / groups, " for a ring with C = ", g.channels, ", got ", weight.size(1));
  TORCH_CHECK(g.span == dilation_t * (g.k_t - 1) + 1, "ring.size(0) must be dilation_t*(k_t-1)+1 = ",
              dilation_t * (g.k_t - 1) + 1, " for k_t = ", g.k_t, ", dilation_t = ", dilation_t,
              ", got ", g.span);
  TORCH_CHECK(slot >= 0 && slot < g.span, "slot must be in [0, ", g.span, "), got ", slot);

  const int64_t in_hw[2] = {g.height, g.width};
  const int64_t k_hw[2] = {g.k_h, g.k_w};
  int64_t out_hw[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t extent = g.dilation[i] * (k_hw[i] - 1) + 1;
    TORCH_CHECK(in_hw[i] + 2 * g.padding[i] >= extent, "padded input (", in_hw[i], " + 2*",
                g.padding[i], ") is smaller than the dilated kernel (", extent, ") in dim ",
                (i == 0 ? "h" : "w"));
    out_hw[i] = (in_hw[i] + 2 * g.padding[i] - extent) / g.stride[i] + 1;
  }
  g.out_height = out_hw[0];
  g.out_width = out_hw[1];
  return g;
}

inline void check_bias(const at::Tensor& bias, const char* name, const RingConv& g,
                       const at::Tensor& ring) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == g.out_channels, name, " must have shape [",
              g.out_channels, "], got ", bias.sizes());
  check_same_device(bias, name, ring);
  check_param_dtype(bias, name, ring.scalar_type());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name, const at::Tensor& ring) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, name, ring);
}

inline void check_frame(const at::Tensor& frame, const at::Tensor& ring) {
  TORCH_CHECK(frame.dim() == 4 && frame.sizes() == ring.sizes().slice(1), "frame must have shape ",
              ring.sizes().slice(1), " (ring without its slot dim), got ", frame.sizes());
  TORCH_CHECK(frame.scalar_type() == ring.scalar_type(), "frame must have the ring's dtype ",
              ring.scalar_type(), ", got ", frame.scalar_type());
  check_same_device(frame, "frame", ring);
}

inline void check_grad_out(const at::Tensor& grad_out, const RingConv& g, const at::Tensor& ring) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.batch &&
                  grad_out.size(1) == g.out_channels && grad_out.size(2) == g.out_height &&
                  grad_out.size(3) == g.out_width,
              "grad_out must have shape [", g.batch, ", ", g.out_channels, ", ", g.out_height, ", ",
              g.out_width, "] (the layer's output for this ring and weight), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == ring.scalar_type(), "grad_out must have the ring's dtype ",
              ring.scalar_type(), ", got ", grad_out.scalar_type());
  check_same_device(grad_out, "grad_out", ring);
}

inline void check_sgd_hyper(double lr, double momentum, double dampening, double weight_decay,
                            bool nesterov) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0, "momentum must be >= 0, got ", momentum);
  TORCH_CHECK(std::isfinite(dampening), "dampening must be finite, got ", dampening);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0,
              "weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0),
              "nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD), got momentum=",
              momentum, ", dampening=", dampening);
}

inline void check_momentum_buffer(const c10::optional<at::Tensor>& buf, const char* name,
                                  const at::Tensor& param, const char* param_name, double momentum,
                                  const at::Tensor& ring) {
  if (momentum == 0) return;
  TORCH_CHECK(buf.has_value(), name, " is required when momentum != 0");
  check_like(*buf, name, param, param_name, ring);
}

// All checks of window_input_grad, whatever the backend; returns the layer's geometry
// (no ring here: span 1, slot 0).
inline RingConv check_window_input_grad(const at::Tensor& grad_out, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  TORCH_CHECK(grad_out.dim() == 4, "grad_out must be 4-D [B, C_out, H_out, W_out], got shape ",
              grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "grad_out must be floating, got ",
              grad_out.scalar_type());
  TORCH_CHECK(weight.dim() == 5, "weight must be 5-D [C_out, C/groups, k_t, k_h, k_w], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.device() == grad_out.device(), "weight must be on ", grad_out.device(),
              " like grad_out, got ", weight.device());
  check_param_dtype(weight, "weight", grad_out.scalar_type());
  check_pair(input_size, "input_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "groups must be >= 1 and divide ",
              "weight.size(0) = ", weight.size(0), ", got ", groups);
  TORCH_CHECK(grad_out.size(1) == weight.size(0), "grad_out.size(1) must be weight.size(0) = ",
              weight.size(0), ", got ", grad_out.size(1));
  for (int i = 0; i < 2; ++i) {
    const int64_t extent = dilation[i] * (weight.size(3 + i) - 1) + 1;
    const int64_t span = input_size[i] + 2 * padding[i] - extent;
    TORCH_CHECK(span >= 0 && span / stride[i] + 1 == grad_out.size(2 + i), "grad_out.size(",
                2 + i, ") = ", grad_out.size(2 + i), " is not the conv output size for input_size ",
                input_size, ", weight ", weight.sizes(), ", stride ", stride, ", padding ", padding,
                ", dilation ", dilation);
  }
  RingConv g = weight_conv(weight, stride, padding, dilation, 1, groups);
  g.span = 1;
  g.batch = grad_out.size(0);
  g.channels = weight.size(1) * groups;
  g.height = input_size[0];
  g.width = input_size[1];
  g.out_height = grad_out.size(2);
  g.out_width = grad_out.size(3);
  return g;
}

// All checks of weight_grad_accumulate, whatever the backend.
inline RingConv check_weight_grad_accumulate(const at::Tensor& grad_weight,
                                             const c10::optional<at::Tensor>& grad_bias,
                                             const at::Tensor& grad_out, const at::Tensor& ring,
                                             int64_t slot, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t dilation_t, int64_t groups) {
  auto g = check_ring_conv(ring, slot, grad_weight, stride, padding, dilation, dilation_t, groups);
  check_grad_out(grad_out, g, ring);
  if (grad_bias.has_value()) check_bias(*grad_bias, "grad_bias", g, ring);
  return g;
}

// All checks of sgd_tick_update, whatever the backend.
inline RingConv check_sgd_tick_update(const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& momentum_buffer,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& bias_momentum_buffer,
                                      const at::Tensor& grad_out, const at::Tensor& ring,
                                      int64_t slot, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t dilation_t, int64_t groups,
                                      double lr, double momentum, double dampening,
                                      double weight_decay, bool nesterov) {
  auto g = check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups);
  check_grad_out(grad_out, g, ring);
  check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov);
  check_momentum_buffer(momentum_buffer, "momentum_buffer", weight, "weight", momentum, ring);
  if (bias.has_value()) {
    check_bias(*bias, "bias", g, ring);
    check_momentum_buffer(bias_momentum_buffer, "bias_momentum_buffer", *bias, "bias", momentum,
                          ring);
  }
  return g;
}

}  // namespace sideways
