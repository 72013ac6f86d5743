// The sideways ops on the GPU as tiled implicit GEMMs (fp32 accumulation of
// fp32/fp16/bf16 activations) sharing one block-tile routine:
//  * weight_update: the per-tap weight gradient of one frame pair (stale ring frame
//    x fresh error) over K = B*H_out*W_out, with the epilogue accumulating into the
//    fp32 gradient buffer or applying torch.optim.SGD's momentum step straight into
//    the weight: the gradient is never written to memory and read back;
//  * ring_conv_forward: output pixels x output channels over the window's taps;
//  * window_input_grad: input pixels x input channels over the error, against the
//    taps' summed weight (the Sideways gradient sent down).
// With fp16/bf16 activations the GEMMs run on tensor cores (wmma, sm_80+; the fp32 master
// weights rounded to the activations' type, as autocast does); fp32 uses fp32 FMA.
// Free of torch headers (raw pointers, cudaStream_t) so that nvcc compiles it on
// machines whose torch has no CUDA, and the host emulation runs it in CI.
#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace sideways {
namespace cuda {

constexpr int kTileM = 32;  // rows of a block's output tile
constexpr int kTileN = 32;  // columns of a block's output tile
constexpr int kTileK = 16;  // reduction step
constexpr int kThreads = 256;
constexpr int kPerThread = (kTileM * kTileN) / kThreads;  // 4 outputs per thread

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

__device__ __forceinline__ int64_t tap_slot(const ConvGeometry& g, int64_t j) {
  const int64_t s = (g.slot - (g.k_t - 1 - j) * g.dil_t) % g.span;
  return s < 0 ? s + g.span : s;
}

// Implicit im2col: the ring value that weight column n = ((c*k_t + j)*k_h + kh)*k_w + kw of
// `group` meets at output pixel p = (b*H_out + oy)*W_out + ox; 0 in the spatial padding.
template <typename T>
__device__ __forceinline__ float window_at(const ConvGeometry& g, const T* __restrict__ ring,
                                           int64_t group, int64_t n, int64_t p) {
  const int64_t taps = g.k_t * g.k_h * g.k_w, hw_out = g.out_height * g.out_width;
  const int64_t c = n / taps, rest = n % taps, j = rest / (g.k_h * g.k_w);
  const int64_t kh = (rest / g.k_w) % g.k_h, kw = rest % g.k_w;
  const int64_t b = p / hw_out, yx = p % hw_out;
  const int64_t y = (yx / g.out_width) * g.stride_h - g.pad_h + kh * g.dil_h;
  const int64_t x = (yx % g.out_width) * g.stride_w - g.pad_w + kw * g.dil_w;
  if (y < 0 || y >= g.height || x < 0 || x >= g.width) return 0.f;
  return to_float(ring[tap_slot(g, j) * g.ring_strides[0] + b * g.ring_strides[1] +
                       (group * (g.channels / g.groups) + c) * g.ring_strides[2] +
                       y * g.ring_strides[3] + x * g.ring_strides[4]]);
}

// The block's kTileM x kTileN tile of A^T B over k in [0, k_total): a(k, row) and b(k, col)
// load one element each (0 outside). Thread t owns outputs t + i*kThreads, i < kPerThread,
// at (out / kTileN, out % kTileN). fp32 FMA from shared memory.
template <class LoadA, class LoadB>
__device__ void tile_gemm_fma(int64_t k_total, LoadA a, LoadB b, float (&acc)[kPerThread]) {
  __shared__ float tile_a[kTileK][kTileM];
  __shared__ float tile_b[kTileK][kTileN];
  const int tid = threadIdx.x;
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < k_total; k0 += kTileK) {
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int64_t k = k0 + e / kTileM;
      tile_a[e / kTileM][e % kTileM] = k < k_total ? a(k, e % kTileM) : 0.f;
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int64_t k = k0 + e / kTileN;
      tile_b[e / kTileN][e % kTileN] = k < k_total ? b(k, e % kTileN) : 0.f;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      for (int i = 0; i < kPerThread; ++i) {
        const int out = tid + i * kThreads;
        acc[i] += tile_a[kk][out / kTileN] * tile_b[kk][out % kTileN];
      }
    }
    __syncthreads();
  }
}

#if defined(SIDEWAYS_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SIDEWAYS_TENSOR_CORES 1
#else
#define SIDEWAYS_TENSOR_CORES 0
#endif

#if SIDEWAYS_TENSOR_CORES
// The same tile on tensor cores, for operands S (fp16/bf16) that a(k, row) and b(k, col)
// return exactly: the 8 warps split it into 4 fragments of 16x16 and each 32-deep k step
// into two 16-deep halves (warps 0-3 the first, 4-7 the second); the halves' fp32 sums meet
// in shared memory at the end. Fragments are touched only through wmma calls.
template <typename S, class LoadA, class LoadB>
__device__ void tile_gemm_tensor_cores(int64_t k_total, LoadA a, LoadB b, float (&acc)[kPerThread]) {
  namespace wmma = nvcuda::wmma;
  static_assert(kTileM == 32 && kTileN == 32 && kThreads == 256, "4 fragments x 2 k halves = 8 warps");
  constexpr int kStep = 32;
  __shared__ __align__(32) S tile_a[kStep][kTileM];  // A as M x K, column-major: (m, k) at k*kTileM + m
  __shared__ __align__(32) S tile_b[kStep][kTileN];  // B as K x N, row-major
  __shared__ __align__(32) float partial[2][kTileM][kTileN];
  const int tid = threadIdx.x, warp = tid / 32;
  const int fm = (warp % 4) / 2, fn = warp % 2, half = warp / 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.f);
  for (int64_t k0 = 0; k0 < k_total; k0 += kStep) {
    for (int e = tid; e < kStep * kTileM; e += kThreads) {
      const int64_t k = k0 + e / kTileM;
      tile_a[e / kTileM][e % kTileM] = from_float<S>(k < k_total ? a(k, e % kTileM) : 0.f);
    }
    for (int e = tid; e < kStep * kTileN; e += kThreads) {
      const int64_t k = k0 + e / kTileN;
      tile_b[e / kTileN][e % kTileN] = from_float<S>(k < k_total ? b(k, e % kTileN) : 0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::col_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb;
    wmma::load_matrix_sync(fa, &tile_a[half * 16][fm * 16], kTileM);
    wmma::load_matrix_sync(fb, &tile_b[half * 16][fn * 16], kTileN);
    wmma::mma_sync(c, fa, fb, c);
    __syncthreads();
  }
  wmma::store_matrix_sync(&partial[half][fm * 16][fn * 16], c, kTileN, wmma::mem_row_major);
  __syncthreads();
  for (int i = 0; i < kPerThread; ++i) {
    const int out = tid + i * kThreads;
    acc[i] = partial[0][out / kTileN][out % kTileN] + partial[1][out / kTileN][out % kTileN];
  }
}
#endif

// The block's tile with operands of type S: tensor cores for fp16/bf16 where the GPU has
// them, fp32 FMA otherwise.
template <typename S, class LoadA, class LoadB>
__device__ __forceinline__ void tile_gemm(int64_t k_total, LoadA a, LoadB b, float (&acc)[kPerThread]) {
#if SIDEWAYS_TENSOR_CORES
  if constexpr (!std::is_same<S, float>::value) {
    tile_gemm_tensor_cores<S>(k_total, a, b, acc);
    return;
  }
#endif
  tile_gemm_fma(k_total, a, b, acc);
}

// grid: (ceil(M/kTileM), ceil(N/kTileN), groups). M = C_out/groups; N = (C/groups)*k_t*k_h*k_w,
// column n = ((c*k_t + j)*k_h + kh)*k_w + kw, the weight's own order.
template <typename T>
__global__ void weight_update_kernel(WeightUpdateArgs a, const T* __restrict__ grad_out,
                                     const T* __restrict__ ring) {
  const ConvGeometry& g = a.g;
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups;
  const int64_t taps = g.k_t * g.k_h * g.k_w, n_cols = cg * taps;
  const int64_t hw_out = g.out_height * g.out_width;
  const int64_t group = blockIdx.z, m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  float acc[kPerThread];
  tile_gemm<T>(  // both operands are activations of type T: exact in T
      g.batch * hw_out,
      [&](int64_t k, int row) {  // the error of output channel m0+row at pixel k
        const int64_t m = m0 + row, b = k / hw_out, yx = k % hw_out;
        if (m >= mg) return 0.f;
        return to_float(grad_out[b * g.out_strides[0] + (group * mg + m) * g.out_strides[1] +
                                 (yx / g.out_width) * g.out_strides[2] +
                                 (yx % g.out_width) * g.out_strides[3]]);
      },
      [&](int64_t k, int col) {  // the ring frame under weight column n0+col at pixel k
        const int64_t n = n0 + col;
        return n < n_cols ? window_at(g, ring, group, n, k) : 0.f;
      },
      acc);
  // Epilogue: the gradient lives only in registers.
  for (int i = 0; i < kPerThread; ++i) {
    const int out = threadIdx.x + i * kThreads;
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

// grid: (ceil(M/kTileM), ceil(N/kTileN), groups). M = B*H_out*W_out output pixels,
// N = C_out/groups output channels, K = (C/groups)*k_t*k_h*k_w.
template <typename T>
__global__ void ring_conv_forward_kernel(ConvGeometry g, const T* __restrict__ ring,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias, T* __restrict__ out) {
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups;
  const int64_t taps = g.k_t * g.k_h * g.k_w, hw_out = g.out_height * g.out_width;
  const int64_t m_total = g.batch * hw_out;
  const int64_t group = blockIdx.z, m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  float acc[kPerThread];
  tile_gemm<T>(  // the fp32 master weights meet fp16/bf16 activations rounded to T, as under autocast
      cg * taps,
      [&](int64_t k, int row) {  // the ring frame of weight column k at output pixel m0+row
        const int64_t m = m0 + row;
        return m < m_total ? window_at(g, ring, group, k, m) : 0.f;
      },
      [&](int64_t k, int col) {  // weight[group*mg + n0+col, tap k]
        const int64_t n = n0 + col;
        return n < mg ? weight[(group * mg + n) * cg * taps + k] : 0.f;
      },
      acc);
  for (int i = 0; i < kPerThread; ++i) {
    const int out_index = threadIdx.x + i * kThreads;
    const int64_t m = m0 + out_index / kTileN, n = n0 + out_index % kTileN;
    if (m >= m_total || n >= mg) continue;
    const int64_t b = m / hw_out, yx = m % hw_out, co = group * mg + n;
    const float v = acc[i] + (bias != nullptr ? bias[co] : 0.f);
    out[b * g.out_strides[0] + co * g.out_strides[1] + (yx / g.out_width) * g.out_strides[2] +
        (yx % g.out_width) * g.out_strides[3]] = from_float<T>(v);
  }
}

// grid: (ceil(M/kTileM), ceil(N/kTileN), groups). M = B*H*W input pixels, N = C/groups input
// channels, K = (C_out/groups)*k_h*k_w; pixel y receives from output row oy when
// oy*stride_h = y + pad_h - kh*dil_h.
template <typename T>
__global__ void window_input_grad_kernel(ConvGeometry g, const T* __restrict__ grad_out,
                                         const float* __restrict__ summed, T* __restrict__ grad_in,
                                         InStrides in) {
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups;
  const int64_t khw = g.k_h * g.k_w, hw = g.height * g.width, m_total = g.batch * hw;
  const int64_t group = blockIdx.z, m0 = blockIdx.x * kTileM, n0 = blockIdx.y * kTileN;
  float acc[kPerThread];
  tile_gemm<T>(  // the fp32 summed weight rounded to T, as under autocast
      mg * khw,
      [&](int64_t k, int row) {  // the error reaching input pixel m0+row through tap k
        const int64_t m = m0 + row;
        if (m >= m_total) return 0.f;
        const int64_t co = k / khw, kh = (k / g.k_w) % g.k_h, kw = k % g.k_w;
        const int64_t b = m / hw, y = (m % hw) / g.width, x = m % g.width;
        const int64_t ty = y + g.pad_h - kh * g.dil_h, tx = x + g.pad_w - kw * g.dil_w;
        if (ty < 0 || tx < 0 || ty % g.stride_h != 0 || tx % g.stride_w != 0) return 0.f;
        const int64_t oy = ty / g.stride_h, ox = tx / g.stride_w;
        if (oy >= g.out_height || ox >= g.out_width) return 0.f;
        return to_float(grad_out[b * g.out_strides[0] + (group * mg + co) * g.out_strides[1] +
                                 oy * g.out_strides[2] + ox * g.out_strides[3]]);
      },
      [&](int64_t k, int col) {  // summed[group*mg + co, n0+col, kh, kw]
        const int64_t n = n0 + col;
        if (n >= cg) return 0.f;
        return summed[((group * mg + k / khw) * cg + n) * khw + k % khw];
      },
      acc);
  for (int i = 0; i < kPerThread; ++i) {
    const int out_index = threadIdx.x + i * kThreads;
    const int64_t m = m0 + out_index / kTileN, n = n0 + out_index % kTileN;
    if (m >= m_total || n >= cg) continue;
    const int64_t b = m / hw, y = (m % hw) / g.width, x = m % g.width;
    grad_in[b * in.s[0] + (group * cg + n) * in.s[1] + y * in.s[2] + x * in.s[3]] =
        from_float<T>(acc[i]);
  }
}

// The grid of a rows x cols x groups problem: row tiles on x (up to 2^31 - 1 blocks: the
// B*H*W pixels of a large batch), column tiles on y and groups on z. Checked against the
// current device's limits (read from it): cudaErrorInvalidConfiguration before anything is
// launched when it does not fit.
static cudaError_t grid_for(int64_t rows, int64_t cols, int64_t groups, dim3* grid) {
  int device = 0, max_x = 0, max_y = 0, max_z = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_x, cudaDevAttrMaxGridDimX, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_y, cudaDevAttrMaxGridDimY, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_z, cudaDevAttrMaxGridDimZ, device);
  if (err != cudaSuccess) return err;
  const int64_t x = (rows + kTileM - 1) / kTileM, y = (cols + kTileN - 1) / kTileN;
  if (x > max_x || y > max_y || groups > max_z || rows <= 0 || cols <= 0 || groups <= 0) {
    return cudaErrorInvalidConfiguration;
  }
  *grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(groups));
  return cudaSuccess;
}

// Runs f with the element type of `dtype` as a value of that type (for deduction).
template <class F>
static cudaError_t dispatch(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t weight_update(const WeightUpdateArgs& a, DType dtype, const void* grad_out,
                          const void* ring, cudaStream_t stream) {
  const ConvGeometry& g = a.g;
  dim3 grid;
  if (const cudaError_t err = grid_for(g.out_channels / g.groups,
                                       (g.channels / g.groups) * g.k_t * g.k_h * g.k_w, g.groups, &grid)) {
    return err;
  }
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    SIDEWAYS_LAUNCH(weight_update_kernel<T>, grid, kThreads, 0, stream, a,
                    static_cast<const T*>(grad_out), static_cast<const T*>(ring));
    return cudaGetLastError();
  });
}

cudaError_t ring_conv_forward(const ConvGeometry& g, DType dtype, const void* ring,
                              const float* weight, const float* bias, void* out,
                              cudaStream_t stream) {
  dim3 grid;
  if (const cudaError_t err =
          grid_for(g.batch * g.out_height * g.out_width, g.out_channels / g.groups, g.groups, &grid)) {
    return err;
  }
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    SIDEWAYS_LAUNCH(ring_conv_forward_kernel<T>, grid, kThreads, 0, stream, g,
                    static_cast<const T*>(ring), weight, bias, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t window_input_grad(const ConvGeometry& g, DType dtype, const void* grad_out,
                              const float* summed_weight, void* grad_in, const int64_t* in_strides,
                              cudaStream_t stream) {
  const InStrides in{{in_strides[0], in_strides[1], in_strides[2], in_strides[3]}};
  dim3 grid;
  if (const cudaError_t err = grid_for(g.batch * g.height * g.width, g.channels / g.groups, g.groups, &grid)) {
    return err;
  }
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    SIDEWAYS_LAUNCH(window_input_grad_kernel<T>, grid, kThreads, 0, stream, g,
                    static_cast<const T*>(grad_out), summed_weight, static_cast<T*>(grad_in), in);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace sideways
