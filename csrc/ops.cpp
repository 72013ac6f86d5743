// The one place where every sideways op is declared. Backend files
// (cpu/sideways_cpu.cpp, cuda/sideways_cuda.cpp) register implementations with
// TORCH_LIBRARY_IMPL; sideways_kernels/ops.py holds the typed wrappers and fakes.
//
// Conventions shared by all ops:
//   ring    [R, B, C, H, W]  the layer's last R inputs, R = dilation_t*(k_t-1)+1
//   slot    index in [0, R) of the newest frame in the ring
//   weight  [C_out, C/groups, k_t, k_h, k_w]; temporal tap j reads ring slot
//           (slot - (k_t-1-j)*dilation_t) mod R
//   stride/padding/dilation are the spatial (h, w) ones.
#include <torch/library.h>

#ifndef SIDEWAYS_NO_PYTHON_MODULE
#include <Python.h>
// A module with no methods, so `import sideways_kernels._C` loads the library
// (and runs the registrations below) without pybind11. The CMake build, loaded
// with torch.ops.load_library, leaves it out.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(sideways, m) {
  // Op 1: write `frame` (if given) into ring[slot] and return the conv output of
  // the window ending at `slot`: [B, C_out, H_out, W_out].
  m.def(
      "ring_conv_forward(Tensor(a!) ring, Tensor? frame, int slot, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int dilation_t, int groups) -> Tensor");
  // Op 2: the Sideways input gradient, sum over the window of every tap's
  // transposed conv of `grad_out`: [B, C, input_size[0], input_size[1]].
  m.def(
      "window_input_grad(Tensor grad_out, Tensor weight, int[2] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Op 3: grad_weight[:, :, j] += conv weight-gradient of (ring tap j, grad_out)
  // for every tap j, and grad_bias += grad_out summed over (B, H, W).
  m.def(
      "weight_grad_accumulate(Tensor(a!) grad_weight, Tensor(b!)? grad_bias, Tensor grad_out, "
      "Tensor ring, int slot, int[2] stride, int[2] padding, int[2] dilation, int dilation_t, "
      "int groups) -> ()");
  // Op 4: the gradient of op 3 applied straight into weight (and bias) with
  // momentum SGD exactly as torch.optim.SGD defines it. `first_step` says the
  // momentum buffers are fresh (torch.optim.SGD then sets buf = grad).
  m.def(
      "sgd_tick_update(Tensor(a!) weight, Tensor(b!)? momentum_buffer, Tensor(c!)? bias, "
      "Tensor(d!)? bias_momentum_buffer, Tensor grad_out, Tensor ring, int slot, int[2] stride, "
      "int[2] padding, int[2] dilation, int dilation_t, int groups, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool first_step) -> ()");
}

// Autocast: the ops compute in the dtypes they are given (a float16/bfloat16 ring with
// float32 master weights is the mixed-precision case; SidewaysConv3d casts its frames to
// the autocast dtype before they reach the ring). Without this, autocast would stay on
// inside the ATen path and re-cast its convolutions, so an op's result dtype would depend
// on the backend. The boxed kernel turns autocast off and calls the op again below it.
namespace {
void autocast_neutral(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}
}  // namespace

#define SIDEWAYS_AUTOCAST_NEUTRAL(m)                                                           \
  for (const char* name :                                                                      \
       {"ring_conv_forward", "window_input_grad", "weight_grad_accumulate", "sgd_tick_update"}) \
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_neutral>());

TORCH_LIBRARY_IMPL(sideways, AutocastCPU, m) { SIDEWAYS_AUTOCAST_NEUTRAL(m) }
TORCH_LIBRARY_IMPL(sideways, AutocastCUDA, m) { SIDEWAYS_AUTOCAST_NEUTRAL(m) }
