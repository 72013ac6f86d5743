// Fused Sideways weight update on the GPU: the per-tap weight gradient of one
// frame pair (stale ring frame x fresh error) as a tiled implicit GEMM over
// K = B*H_out*W_out, with the epilogue either accumulating into the fp32
// gradient buffer or applying torch.optim.SGD's momentum step straight into
// the weight, so the gradient is never written to memory and read back.
//
// Free of torch headers (raw pointers, cudaStream_t) so that nvcc compiles it
// on machines whose torch has no CUDA; the torch binding lives elsewhere.
#include <cstdint>

#include "cuda_compat.h"
#include "weight_update.h"

namespace sideways {
namespace cuda {

constexpr int kTileM = 32;  // output channels per block
constexpr int kTileN = 32;  // (c, j, kh, kw) weight columns per block
constexpr int kTileK = 16;  // reduction (b, y, x) per step
constexpr int kThreads = 256;
constexpr int kPerThread = (kTileM * kTileN) / kThreads;  // 4 outputs per thread

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// grid: (ceil(N/kTileN), ceil(M/kTileM), groups); block: kThreads.
// M = C_out/groups, N = (C/groups)*k_t*k_h*k_w, column n = ((c*k_t + j)*k_h + kh)*k_w + kw,
// i.e. the weight's own [C/groups, k_t, k_h, k_w] order.
template <typename T>
__global__ void weight_update_kernel(WeightUpdateArgs a, const T* __restrict__ grad_out,
                                     const T* __restrict__ ring) {
  __shared__ float tile_err[kTileK][kTileM];
  __shared__ float tile_act[kTileK][kTileN];

  const int64_t cg = a.channels / a.groups;
  const int64_t mg = a.out_channels / a.groups;
  const int64_t taps = a.k_t * a.k_h * a.k_w;
  const int64_t n_cols = cg * taps;
  const int64_t hw_out = a.out_height * a.out_width;
  const int64_t k_total = a.batch * hw_out;
  const int64_t group = blockIdx.z;
  const int64_t m0 = blockIdx.y * kTileM;
  const int64_t n0 = blockIdx.x * kTileN;
  const int tid = threadIdx.x;

  float acc[kPerThread];
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;

  for (int64_t k0 = 0; k0 < k_total; k0 += kTileK) {
    // Load the error tile: err[k][m] = grad_out[b, group*mg + m, y, x].
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int kk = e / kTileM, mm = e % kTileM;
      const int64_t k = k0 + kk, m = m0 + mm;
      float v = 0.f;
      if (k < k_total && m < mg) {
        const int64_t b = k / hw_out, yx = k % hw_out;
        v = to_float(grad_out[b * a.grad_strides[0] + (group * mg + m) * a.grad_strides[1] +
                              (yx / a.out_width) * a.grad_strides[2] + (yx % a.out_width) * a.grad_strides[3]]);
      }
      tile_err[kk][mm] = v;
    }
    // Load the activation tile (im2col on the fly from the tap's ring slot).
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = e / kTileN, nn = e % kTileN;
      const int64_t k = k0 + kk, n = n0 + nn;
      float v = 0.f;
      if (k < k_total && n < n_cols) {
        const int64_t c = n / taps, rest = n % taps;
        const int64_t j = rest / (a.k_h * a.k_w);
        const int64_t kh = (rest / a.k_w) % a.k_h, kw = rest % a.k_w;
        const int64_t b = k / hw_out, yx = k % hw_out;
        const int64_t y = (yx / a.out_width) * a.stride_h - a.pad_h + kh * a.dil_h;
        const int64_t x = (yx % a.out_width) * a.stride_w - a.pad_w + kw * a.dil_w;
        if (y >= 0 && y < a.height && x >= 0 && x < a.width) {
          int64_t s = (a.slot - (a.k_t - 1 - j) * a.dil_t) % a.span;
          if (s < 0) s += a.span;
          v = to_float(ring[s * a.ring_strides[0] + b * a.ring_strides[1] +
                            (group * cg + c) * a.ring_strides[2] + y * a.ring_strides[3] +
                            x * a.ring_strides[4]]);
        }
      }
      tile_act[kk][nn] = v;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      for (int i = 0; i < kPerThread; ++i) {
        const int out = tid + i * kThreads;
        acc[i] += tile_err[kk][out / kTileN] * tile_act[kk][out % kTileN];
      }
    }
    __syncthreads();
  }

  // Epilogue: the gradient lives only in registers.
  for (int i = 0; i < kPerThread; ++i) {
    const int out = tid + i * kThreads;
    const int64_t m = m0 + out / kTileN, n = n0 + out % kTileN;
    if (m >= mg || n >= n_cols) continue;
    const int64_t w = (group * mg + m) * n_cols + n;
    float d = acc[i];
    if (a.mode == WeightUpdateMode::kAccumulate) {
      a.grad_weight[w] += d;
      continue;
    }
    if (a.weight_decay != 0.f) d += a.weight_decay * a.weight[w];
    if (a.momentum_buffer != nullptr) {
      const float v = a.first_step ? d : a.momentum * a.momentum_buffer[w] + (1.f - a.dampening) * d;
      a.momentum_buffer[w] = v;
      d = a.nesterov ? d + a.momentum * v : v;
    }
    a.weight[w] -= a.lr * d;
  }
}

template <typename T>
static cudaError_t launch(const WeightUpdateArgs& a, const void* grad_out, const void* ring,
                          cudaStream_t stream) {
  const int64_t cg = a.channels / a.groups;
  const int64_t n_cols = cg * a.k_t * a.k_h * a.k_w;
  const dim3 grid((n_cols + kTileN - 1) / kTileN,
                  (a.out_channels / a.groups + kTileM - 1) / kTileM, a.groups);
  SIDEWAYS_LAUNCH(weight_update_kernel<T>, grid, kThreads, 0, stream, a,
                  static_cast<const T*>(grad_out), static_cast<const T*>(ring));
  return cudaGetLastError();
}

cudaError_t weight_update(const WeightUpdateArgs& args, DType dtype, const void* grad_out,
                          const void* ring, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float>(args, grad_out, ring, stream);
    case DType::kFloat16: return launch<__half>(args, grad_out, ring, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, grad_out, ring, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sideways
