// The CPU kernels are the ATen implementations (oneDNN convolutions on x86, a fused
// SGD pass): see ../aten_ops.cpp.
#include <torch/library.h>

#include "../aten_ops.h"

TORCH_LIBRARY_IMPL(sideways, CPU, m) {
  m.impl("ring_conv_forward", &sideways::ring_conv_forward_aten);
  m.impl("window_input_grad", &sideways::window_input_grad_aten);
  m.impl("weight_grad_accumulate", &sideways::weight_grad_accumulate_aten);
  m.impl("sgd_tick_update", &sideways::sgd_tick_update_aten);
}
