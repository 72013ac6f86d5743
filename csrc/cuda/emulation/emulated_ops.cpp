// C entry points of the emulated CUDA kernels, for python_tests/test_cuda_emulation.py
// (loaded with ctypes). Built with the host compiler, as that test does:
//   g++ -std=c++17 -DSIDEWAYS_EMULATE -Icsrc/cuda -x c++ csrc/cuda/kernels.cu
//       -x none csrc/cuda/emulation/emulated_ops.cpp -shared -fPIC -pthread -o libsideways_emulated.so
// `dims`: span, batch, channels, height, width, out_channels, k_t, k_h, k_w, out_height,
// out_width, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups, slot;
// `strides`: the ring's 5, then the output-shaped tensor's 4 (grad_out, or out).
#include <cmath>
#include <cstdint>
#include <vector>

#include "../kernels.h"

using namespace sideways::cuda;

static ConvGeometry geometry(const int64_t* dims, const int64_t* strides) {
  ConvGeometry g{};
  int64_t* fields[] = {&g.span, &g.batch, &g.channels, &g.height, &g.width, &g.out_channels, &g.k_t,
                       &g.k_h, &g.k_w, &g.out_height, &g.out_width, &g.stride_h, &g.stride_w, &g.pad_h,
                       &g.pad_w, &g.dil_h, &g.dil_w, &g.dil_t, &g.groups, &g.slot};
  for (int i = 0; i < 20; ++i) *fields[i] = dims[i];
  for (int i = 0; i < 5; ++i) g.ring_strides[i] = strides[i];
  for (int i = 0; i < 4; ++i) g.out_strides[i] = strides[5 + i];
  return g;
}

static const DType kTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// `split_k`: 0 lets plan_weight_update choose (for the emulated H100's 132 SMs), else forced;
// the factor taken is written to *split_k_taken. Returns -1 when a split-K launch leaves a
// tile counter non-zero (the next launch would then go wrong).
extern "C" int sideways_emulated_weight_update(const int64_t* dims, const int64_t* strides, int mode,
                                               float* grad_weight, float* weight, float* momentum_buffer,
                                               const double* hyper, int nesterov, int first_step, int dtype,
                                               const void* grad_out, const void* ring, int64_t split_k,
                                               int64_t* split_k_taken) {
  WeightUpdateArgs a{};
  a.g = geometry(dims, strides);
  WeightUpdatePlan plan{};
  if (const cudaError_t err = plan_weight_update(a.g, kTypes[dtype], split_k, &plan)) return static_cast<int>(err);
  std::vector<float> partials(plan.partial_floats, std::nanf(""));  // poison: every partial read must be written
  std::vector<int> counters(plan.counters, 0);
  a.split_k = plan.split_k;
  a.partials = partials.data();
  a.counters = counters.data();
  *split_k_taken = plan.split_k;
  a.mode = mode == 0 ? WeightUpdateMode::kAccumulate : WeightUpdateMode::kSgd;
  a.grad_weight = grad_weight;
  a.weight = weight;
  a.momentum_buffer = momentum_buffer;
  a.lr = static_cast<float>(hyper[0]);
  a.momentum = static_cast<float>(hyper[1]);
  a.dampening = static_cast<float>(hyper[2]);
  a.weight_decay = static_cast<float>(hyper[3]);
  a.nesterov = nesterov != 0;
  a.first_step = first_step != 0;
  const int err = static_cast<int>(weight_update(a, kTypes[dtype], grad_out, ring, nullptr));
  for (const int c : counters)
    if (c != 0) return -1;
  return err;
}

// 16-byte asynchronous copies issued since the last call (the vectorised loads' count).
extern "C" int64_t sideways_emulated_async_copies() { return sideways_emu::async_copies.exchange(0); }

extern "C" int sideways_emulated_ring_conv_forward(const int64_t* dims, const int64_t* strides, int dtype,
                                                   const void* ring, const void* weight, const float* bias,
                                                   void* out) {
  return static_cast<int>(ring_conv_forward(geometry(dims, strides), kTypes[dtype], ring, weight, bias, out, nullptr));
}

extern "C" int sideways_emulated_window_input_grad(const int64_t* dims, const int64_t* strides, int dtype,
                                                   const void* grad_out, const void* summed, void* grad_in,
                                                   const int64_t* in_strides) {
  return static_cast<int>(
      window_input_grad(geometry(dims, strides), kTypes[dtype], grad_out, summed, grad_in, in_strides, nullptr));
}
