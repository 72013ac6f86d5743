// The sideways ops written with ATen calls, for any device: the CPU kernels
// (oneDNN on x86) and, on CUDA, the cuDNN-backed path beside the fused kernels.
// One call per op and tick: the temporal window is one 2-D convolution (forward)
// or one weight-gradient GEMM (backward) instead of k_t separate ones, and on CPU
// the SGD step is one fused pass over the weight.
#include "aten_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "checks.h"

namespace sideways {
namespace {

// The window as one 2-D conv: `input` [B, groups * n * C/groups, H, W] holds n frame
// groups, and tap j's frame is group `group_of_tap[j]`; `weight2d(...)` lays the
// taps' weights out to match. Two layouts:
//  * slot order, no copy: a ring whose memory is [B, H, W, R, C] (ops.empty_ring) is
//    already a channels-last image with R*C channels, one group per ring slot. Used
//    when every slot is a tap (dilation_t == 1) and groups == 1.
//  * tap order: the k_t frames are gathered (one copy) with the groups interleaved.
struct Window {
  at::Tensor input;
  std::vector<int64_t> group_of_tap;
  int64_t n_groups;
};

Window stage_window(const at::Tensor& ring, const RingConv& g, int64_t slot) {
  const int64_t C = g.channels, R = g.span;
  if (g.k_t == 1) return {ring.select(0, slot), {0}, 1};
  std::vector<int64_t> taps(g.k_t);
  for (int64_t j = 0; j < g.k_t; ++j) taps[j] = g.tap_slot(slot, j);
  const auto s = ring.strides();
  const bool interleaved = s[2] == 1 && s[0] == C && s[4] == R * C && s[3] == g.width * R * C &&
                           s[1] == g.height * g.width * R * C;
  if (interleaved && g.groups == 1 && R == g.k_t) {
    return {ring.as_strided({g.batch, R * C, g.height, g.width}, {s[1], 1, s[3], s[4]},
                            ring.storage_offset()),
            taps, R};
  }
  auto index = at::tensor(taps, at::TensorOptions().dtype(at::kLong)).to(ring.device());
  const int64_t cg = C / g.groups;
  auto input = ring.index_select(0, index)
                   .reshape({g.k_t, g.batch, g.groups, cg, g.height, g.width})
                   .permute({1, 2, 0, 3, 4, 5})
                   .reshape({g.batch, g.groups * g.k_t * cg, g.height, g.width});
  std::vector<int64_t> in_order(g.k_t);
  for (int64_t j = 0; j < g.k_t; ++j) in_order[j] = j;
  return {input, in_order, g.k_t};
}

at::Tensor tap_index(const Window& w, const at::Tensor& like) {
  return at::tensor(w.group_of_tap, at::TensorOptions().dtype(at::kLong)).to(like.device());
}

// weight [C_out, C/groups, k_t, kh, kw] -> [C_out, n_groups*C/groups, kh, kw] matching `w`.
at::Tensor weight2d(const at::Tensor& weight, const RingConv& g, const Window& w,
                    at::ScalarType dtype) {
  const int64_t cg = g.channels / g.groups;
  auto taps_first = weight.to(dtype).permute({0, 2, 1, 3, 4});  // [C_out, k_t, C/groups, kh, kw]
  bool identity = true;
  for (int64_t j = 0; j < g.k_t; ++j) identity = identity && w.group_of_tap[j] == j;
  if (!identity) {  // slot order: group r holds the tap that reads slot r
    auto out = at::empty({g.out_channels, w.n_groups, cg, g.k_h, g.k_w}, taps_first.options());
    out.index_copy_(1, tap_index(w, weight), taps_first);
    taps_first = out;
  }
  return taps_first.reshape({g.out_channels, w.n_groups * cg, g.k_h, g.k_w});
}

// The weight gradient of one frame pair for all taps, [C_out, k_t, C/groups, kh, kw].
at::Tensor window_weight_grad(const at::Tensor& grad_out, const at::Tensor& ring,
                              const at::Tensor& weight, const RingConv& g, int64_t slot) {
  auto w = stage_window(ring, g, slot);
  at::Tensor input = w.input;
  std::vector<int64_t> stride{g.stride[0], g.stride[1]};
  // oneDNN's CPU weight gradient of a 1x1 kernel with a spatial stride on channels-last input
  // first gathers the strided positions into a per-thread workspace and writes past it when the
  // input has fewer channels than its block (oneDNN issue 6035: hangs, crashes, wrong numbers;
  // r(2+1)d's downsampling 1x1 convs at small widths). A 1x1 kernel reads exactly those
  // positions: slice them and run at stride 1; with padding (no slice expresses it) the blocked
  // NCHW layout, which takes another path. sideways_kernels/torch_backend.py does the same.
  if (input.is_cpu() && g.k_h == 1 && g.k_w == 1 && (stride[0] > 1 || stride[1] > 1)) {
    if (g.padding[0] == 0 && g.padding[1] == 0) {
      input = input.slice(2, 0, c10::nullopt, stride[0]).slice(3, 0, c10::nullopt, stride[1]);
      stride = {1, 1};
    } else {
      input = input.contiguous();
    }
  }
  auto grads = at::convolution_backward(
      grad_out, input, weight2d(weight, g, w, ring.scalar_type()), c10::nullopt, stride,
      {g.padding[0], g.padding[1]}, {g.dilation[0], g.dilation[1]}, false, {0, 0}, g.groups,
      {false, true, false});
  auto per_group = std::get<1>(grads).view(
      {g.out_channels, w.n_groups, g.channels / g.groups, g.k_h, g.k_w});
  return per_group.index_select(1, tap_index(w, grad_out));
}

}  // namespace

at::Tensor ring_conv_forward_aten(at::Tensor ring, const c10::optional<at::Tensor>& frame,
                                 int64_t slot, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t dilation_t, int64_t groups) {
  auto g = check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups);
  if (bias.has_value()) check_bias(*bias, "bias", g, ring);
  if (frame.has_value()) {
    check_frame(*frame, ring);
    ring.select(0, slot).copy_(*frame);
  }
  at::Tensor b = bias.has_value() ? bias->to(ring.scalar_type()) : at::Tensor();
  auto w = stage_window(ring, g, slot);
  // Channels-last whatever the ring's layout (oneDNN's fast layout; the next layer's ring
  // and this layer's grad_out keep it), and so the result matches the fake kernel's.
  return at::conv2d(w.input, weight2d(weight, g, w, ring.scalar_type()), b, stride, padding,
                    dilation, groups)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor window_input_grad_aten(const at::Tensor& grad_out, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  check_window_input_grad(grad_out, weight, input_size, stride, padding, dilation, groups);
  std::vector<int64_t> output_padding(2);  // the rows/columns the conv's stride dropped
  for (int i = 0; i < 2; ++i) {
    const int64_t extent = dilation[i] * (weight.size(3 + i) - 1) + 1;
    output_padding[i] = (input_size[i] + 2 * padding[i] - extent) % stride[i];
  }
  // Every tap's input gradient is linear in its weight, so their sum over the
  // window is one transposed conv with the taps' weights summed.
  auto summed = weight.sum(2).to(grad_out.scalar_type());
  return at::conv_transpose2d(grad_out, summed, {}, stride, padding, output_padding, groups,
                              dilation)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

void weight_grad_accumulate_aten(at::Tensor grad_weight, const c10::optional<at::Tensor>& grad_bias,
                                const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t dilation_t, int64_t groups) {
  auto g = check_weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                        dilation, dilation_t, groups);
  auto taps = window_weight_grad(grad_out, ring, grad_weight, g, slot);
  grad_weight.add_(taps.permute({0, 2, 1, 3, 4}));
  mark_written(grad_weight);
  if (grad_bias.has_value()) {
    grad_bias->add_(grad_out.sum({0, 2, 3}, false, grad_bias->scalar_type()));
    mark_written(*grad_bias);
  }
}

namespace {

// One pass of torch.optim.SGD's update over a contiguous param (and buffer):
//   d = grad + wd*param; buf = first ? d : m*buf + (1-damp)*d;
//   d = nesterov ? d + m*buf : buf; param -= lr*d
// `grad` is a 5-D strided view of the param's shape whose last two dims are
// dense, so the permuted tap gradients are read in place.
template <typename scalar_t>
void sgd_pass(scalar_t* param, scalar_t* buf, const at::Tensor& grad, const SgdHyper& h) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto sizes = grad.sizes();
  const auto strides = grad.strides();
  const scalar_t* gdata = grad.const_data_ptr<scalar_t>();
  const int64_t inner = sizes[3] * sizes[4];
  const int64_t rows = sizes[0] * sizes[1] * sizes[2];
  const acc_t lr = h.lr, m = h.momentum, wd = h.weight_decay, keep = 1 - h.dampening;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i0 = r / (sizes[1] * sizes[2]);
      const int64_t i1 = (r / sizes[2]) % sizes[1];
      const int64_t i2 = r % sizes[2];
      const scalar_t* gr = gdata + i0 * strides[0] + i1 * strides[1] + i2 * strides[2];
      scalar_t* p = param + r * inner;
      scalar_t* b = buf ? buf + r * inner : nullptr;
      for (int64_t k = 0; k < inner; ++k) {
        acc_t d = static_cast<acc_t>(gr[k]);
        if (wd != 0) d += wd * static_cast<acc_t>(p[k]);
        if (b) {
          acc_t v = h.first_step ? d : m * static_cast<acc_t>(b[k]) + keep * d;
          b[k] = static_cast<scalar_t>(v);
          v = static_cast<acc_t>(b[k]);  // what the optimizer would read back
          d = h.nesterov ? d + m * v : v;
        }
        p[k] = static_cast<scalar_t>(static_cast<acc_t>(p[k]) - lr * d);
      }
    }
  });
}

// The same update with ATen ops, for params or buffers that are not contiguous.
void sgd_strided(at::Tensor param, const c10::optional<at::Tensor>& buf, at::Tensor grad,
                 const SgdHyper& h) {
  if (h.weight_decay != 0) grad = grad.add(param, h.weight_decay);
  if (buf.has_value()) {
    if (h.first_step) {
      buf->copy_(grad);
    } else {
      buf->mul_(h.momentum).add_(grad, 1 - h.dampening);
    }
    grad = h.nesterov ? grad.add(*buf, h.momentum) : *buf;
  }
  param.add_(grad, -h.lr);
}

}  // namespace

void sgd_apply(at::Tensor param, const c10::optional<at::Tensor>& buf, const at::Tensor& grad,
               const SgdHyper& h) {
  at::Tensor g5 = grad.to(param.scalar_type());
  while (g5.dim() < 5) g5 = g5.unsqueeze(-1);
  const bool dense_tail = g5.stride(4) == 1 && g5.stride(3) == g5.size(4);
  if (param.is_cpu() && param.is_contiguous() && (!buf.has_value() || buf->is_contiguous()) && dense_tail) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_pass", [&] {
      sgd_pass<scalar_t>(param.mutable_data_ptr<scalar_t>(),
                         buf.has_value() ? buf->mutable_data_ptr<scalar_t>() : nullptr, g5, h);
    });
  } else {
    sgd_strided(param, buf, grad.to(param.scalar_type()), h);
  }
  mark_written(param);
  if (buf.has_value()) mark_written(*buf);
}

void sgd_tick_update_aten(at::Tensor weight, const c10::optional<at::Tensor>& momentum_buffer,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& bias_momentum_buffer,
                         const at::Tensor& grad_out, const at::Tensor& ring, int64_t slot,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t dilation_t, int64_t groups, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool first_step) {
  auto g = check_sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring,
                                 slot, stride, padding, dilation, dilation_t, groups, lr, momentum,
                                 dampening, weight_decay, nesterov);
  const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, first_step};
  auto no_buf = c10::optional<at::Tensor>();
  auto taps = window_weight_grad(grad_out, ring, weight, g, slot);
  sgd_apply(weight, momentum != 0 ? momentum_buffer : no_buf, taps.permute({0, 2, 1, 3, 4}), h);
  if (bias.has_value()) {
    sgd_apply(*bias, momentum != 0 ? bias_momentum_buffer : no_buf,
              grad_out.sum({0, 2, 3}, false, bias->scalar_type()), h);
  }
}

}  // namespace sideways
