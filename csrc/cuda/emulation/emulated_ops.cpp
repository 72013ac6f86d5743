// C entry points of the emulated CUDA kernels, for python_tests/test_cuda_emulation.py
// (loaded with ctypes). Built with the host compiler, as that test does:
//   g++ -std=c++17 -DSIDEWAYS_EMULATE -Icsrc/cuda -x c++ csrc/cuda/weight_update.cu
//       -x none csrc/cuda/emulation/emulated_ops.cpp -shared -fPIC -pthread -o libsideways_emulated.so
#include <cstdint>

#include "../weight_update.h"

extern "C" int sideways_emulated_weight_update(const int64_t* dims, const int64_t* strides, int mode, float* grad_weight, float* weight,
                                               float* momentum_buffer, const double* hyper, int nesterov,
                                               int first_step, int dtype, const void* grad_out, const void* ring) {
  using namespace sideways::cuda;
  WeightUpdateArgs a{};
  // dims: span, batch, channels, height, width, out_channels, k_t, k_h, k_w, out_height, out_width,
  //       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups, slot
  int64_t* fields[] = {&a.span, &a.batch, &a.channels, &a.height, &a.width, &a.out_channels, &a.k_t, &a.k_h,
                       &a.k_w, &a.out_height, &a.out_width, &a.stride_h, &a.stride_w, &a.pad_h, &a.pad_w,
                       &a.dil_h, &a.dil_w, &a.dil_t, &a.groups, &a.slot};
  for (int i = 0; i < 20; ++i) *fields[i] = dims[i];
  for (int i = 0; i < 5; ++i) a.ring_strides[i] = strides[i];  // strides: ring (5), then grad_out (4)
  for (int i = 0; i < 4; ++i) a.grad_strides[i] = strides[5 + i];
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
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  return static_cast<int>(weight_update(a, types[dtype], grad_out, ring, nullptr));
}
