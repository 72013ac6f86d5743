// The sideways ops on the GPU as implicit GEMMs (fp32 accumulation of fp32/fp16/bf16
// activations) sharing one block routine, block_gemm:
//  * weight_update: the per-tap weight gradient of one frame pair (stale ring frame
//    x fresh error) over K = B*H_out*W_out, split over several blocks when its few output
//    tiles would leave SMs idle; the epilogue accumulates into the fp32 gradient buffer or
//    applies torch.optim.SGD's momentum step straight into the weight (the gradient is
//    never written to memory and read back, except as split-K partials);
//  * ring_conv_forward: output pixels x output channels over the window's taps;
//  * window_input_grad: input pixels x input channels over the error, against the
//    taps' summed weight (the Sideways gradient sent down).
// A block computes a 128 x 128 tile with 8 warps through a multi-stage cp.async pipeline:
// while one K step is multiplied the next ones are in flight. Activations are channels-last,
// so the GEMM axes that run over channels (tap-major: k or n = tap * channels + channel) are
// contiguous and load as 16-byte copies (zero-filled in the padding and past the edges), and
// so do the weights, which the caller hands over in the activations' type (the fp32 masters
// rounded as autocast rounds them) and in the GEMM's layout, each output row dense along K;
// other layouts go through registers one element at a time. fp16/bf16 multiply on tensor
// cores (wmma, sm_80+), fp32 with FMA.
// Free of torch headers (raw pointers, cudaStream_t) so that nvcc compiles it on
// machines whose torch has no CUDA, and the host emulation runs it in CI.
#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace sideways {
namespace cuda {

constexpr int kThreads = 256;  // 8 warps
constexpr int kTileM = 128;    // rows of a block's output tile
constexpr int kTileN = 128;    // columns of a block's output tile

// Per element type S of the operands in shared memory: the K step, the pipeline depth, the
// 16-byte vector and the row padding (in elements) that keeps the tile rows off the same
// banks while leaving every row 16-byte aligned and every wmma fragment 32-byte aligned.
template <typename S>
struct Tiling {
  static constexpr bool kTensorCores = !std::is_same<S, float>::value;
  static constexpr int kStepK = kTensorCores ? 32 : 16;
  static constexpr int kStages = kTensorCores ? 4 : 3;
  static constexpr int kVector = 16 / static_cast<int>(sizeof(S));
  static constexpr int kPad = kVector;
};

// Which axis of an operand tile is contiguous in shared memory (and, for 16-byte copies, in
// global memory): kK, a [rows][K step] tile; kRows, a [K step][rows] tile.
enum class Major { kK, kRows };

template <typename S, Major L, int kRowsPerTile>
struct TileShape {
  static constexpr int kLead = L == Major::kK ? Tiling<S>::kStepK + Tiling<S>::kPad : kRowsPerTile + Tiling<S>::kPad;
  static constexpr int kElements = (L == Major::kK ? kRowsPerTile : Tiling<S>::kStepK) * kLead;
  __device__ static int offset(int k, int row) { return L == Major::kK ? row * kLead + k : k * kLead + row; }
};

// block_gemm's shared memory for operand tiles of type S laid out LA and LB: kStages stages of
// both tiles, then the warps' epilogue scratch (tensor cores only). Each kernel names its own,
// and its launch asks for kBytes of the same type.
template <typename S_, Major LA_, Major LB_>
struct SharedLayout {
  using S = S_;
  static constexpr Major LA = LA_, LB = LB_;
  static constexpr int kStageA = TileShape<S, LA, kTileM>::kElements, kStageB = TileShape<S, LB, kTileN>::kElements;
  static constexpr int kTileBytes = Tiling<S>::kStages * (kStageA + kStageB) * static_cast<int>(sizeof(S));
  static constexpr int kBytes = kTileBytes + (Tiling<S>::kTensorCores ? kThreads / 32 * 256 * 4 : 0);
};
template <typename T>  // the weight update: error and window both along their rows (channels)
using UpdateShared = SharedLayout<T, Major::kRows, Major::kRows>;
template <typename T>  // the forward and the input gradient: activations and weights along K
using ConvShared = SharedLayout<T, Major::kK, Major::kK>;

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

// --- operands: element (k, row) of a GEMM operand, and where kVector of them start in
// memory when the operand is `vectorised` (they run along its contiguous axis, which the
// launch checked has stride 1, 16-byte alignment and a channel count that vectors never
// straddle); null means zeros. Rows and k outside the problem read 0.

// The ring value of channel c of `group` under temporal tap j and spatial tap (kh, kw) at
// output pixel p = (b*H_out + oy)*W_out + ox; null in the spatial padding.
template <typename T>
__device__ __forceinline__ const T* window_at(const ConvGeometry& g, const T* ring, int64_t group, int64_t c,
                                              int64_t tap, int64_t p) {
  const int64_t khw = g.k_h * g.k_w, j = tap / khw, kh = (tap % khw) / g.k_w, kw = tap % g.k_w;
  const int64_t hw_out = g.out_height * g.out_width, b = p / hw_out, yx = p % hw_out;
  const int64_t y = (yx / g.out_width) * g.stride_h - g.pad_h + kh * g.dil_h;
  const int64_t x = (yx % g.out_width) * g.stride_w - g.pad_w + kw * g.dil_w;
  if (y < 0 || y >= g.height || x < 0 || x >= g.width) return nullptr;
  return ring + tap_slot(g, j) * g.ring_strides[0] + b * g.ring_strides[1] +
         (group * (g.channels / g.groups) + c) * g.ring_strides[2] + y * g.ring_strides[3] + x * g.ring_strides[4];
}

// The error of output channel `channel` (of all C_out) at output pixel (b, oy, ox).
template <typename T>
__device__ __forceinline__ const T* error_at(const ConvGeometry& g, const T* grad_out, int64_t b, int64_t channel,
                                             int64_t oy, int64_t ox) {
  return grad_out + b * g.out_strides[0] + channel * g.out_strides[1] + oy * g.out_strides[2] + ox * g.out_strides[3];
}

template <typename T>
__device__ __forceinline__ float value_of(const T* p) { return p != nullptr ? to_float(*p) : 0.f; }

// Weight update, A (k = output pixel, row = output channel of the group): the error.
template <typename T>
struct ErrorByPixel {
  const ConvGeometry& g;
  const T* grad_out;
  int64_t group, channels;  // channels: C_out / groups
  bool vectorised;
  __device__ const T* at(int64_t k, int64_t row) const {
    if (row >= channels) return nullptr;
    const int64_t hw_out = g.out_height * g.out_width, yx = k % hw_out;
    return error_at(g, grad_out, k / hw_out, group * channels + row, yx / g.out_width, yx % g.out_width);
  }
};

// Weight update, B (k = output pixel, column n = tap * C/groups + channel): the window.
// Forward, A (k = tap * C/groups + channel, row = output pixel): the same values transposed.
template <typename T, bool kByPixel>
struct Window {
  const ConvGeometry& g;
  const T* ring;
  int64_t group, channels, taps;  // channels: C / groups
  bool vectorised;
  __device__ const T* at(int64_t k, int64_t row) const {
    const int64_t pixel = kByPixel ? k : row, n = kByPixel ? row : k;
    const int64_t limit = kByPixel ? channels * taps : g.batch * g.out_height * g.out_width;
    if (row >= limit) return nullptr;
    return window_at(g, ring, group, n % channels, n / channels, pixel);
  }
};

// Forward and input gradient, B (column = output row of the GEMM within the group, k along
// its reduction): a weight in the GEMM's layout, [groups * rows, k_total] dense along k.
template <typename T>
struct RowsAlongK {
  const T* weight;
  int64_t group, rows, k_total;  // rows per group
  bool vectorised;
  __device__ const T* at(int64_t k, int64_t col) const {
    return col < rows ? weight + (group * rows + col) * k_total + k : nullptr;
  }
};

// Input gradient, A (k = spatial tap * C_out/groups + output channel, row = input pixel):
// the error reaching input pixel (b, y, x) through tap (kh, kw), from output row oy when
// oy*stride_h = y + pad_h - kh*dil_h (likewise for x); null where no output pixel does.
template <typename T>
struct ErrorReaching {
  const ConvGeometry& g;
  const T* grad_out;
  int64_t group, channels;  // channels: C_out / groups
  bool vectorised;
  __device__ const T* at(int64_t k, int64_t row) const {
    const int64_t hw = g.height * g.width;
    if (row >= g.batch * hw) return nullptr;
    const int64_t co = k % channels, tap = k / channels, kh = tap / g.k_w, kw = tap % g.k_w;
    const int64_t b = row / hw, y = (row % hw) / g.width, x = row % g.width;
    const int64_t ty = y + g.pad_h - kh * g.dil_h, tx = x + g.pad_w - kw * g.dil_w;
    if (ty < 0 || tx < 0 || ty % g.stride_h != 0 || tx % g.stride_w != 0) return nullptr;
    const int64_t oy = ty / g.stride_h, ox = tx / g.stride_w;
    if (oy >= g.out_height || ox >= g.out_width) return nullptr;
    return error_at(g, grad_out, b, group * channels + co, oy, ox);
  }
};

// --- the block routine

// One K step [k0, k0 + kStepK) of operand `op` into `tile` (stage buffer), rows [r0, r0 +
// kRowsPerTile): 16-byte asynchronous copies when the operand is vectorised, else element
// loads through registers. Nothing at or past k_end is read (zeros instead).
template <typename S, Major L, int kRowsPerTile, class Operand>
__device__ __forceinline__ void load_step(S* tile, const Operand& op, int64_t k0, int64_t k_end, int64_t r0) {
  using T = Tiling<S>;
  using Shape = TileShape<S, L, kRowsPerTile>;
  constexpr int kChunksPerLine = (L == Major::kK ? T::kStepK : kRowsPerTile) / T::kVector;
  constexpr int kChunks = kRowsPerTile * T::kStepK / T::kVector;
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int line = c / kChunksPerLine, along = (c % kChunksPerLine) * T::kVector;
    const int k = L == Major::kK ? along : line, row = L == Major::kK ? line : along;
    S* dst = tile + Shape::offset(k, row);
    if (op.vectorised) {  // the chunk's k are all below k_end or all not (k_end is a multiple of kVector)
      const auto* src = k0 + k < k_end ? op.at(k0 + k, r0 + row) : nullptr;
      if (src != nullptr) {
        __pipeline_memcpy_async(dst, src, 16);
      } else {
        for (int e = 0; e < T::kVector; ++e) dst[e] = from_float<S>(0.f);
      }
    } else {
      for (int e = 0; e < T::kVector; ++e) {
        const int64_t ke = k0 + k + (L == Major::kK ? e : 0), re = r0 + row + (L == Major::kK ? 0 : e);
        dst[e] = from_float<S>(ke < k_end ? value_of(op.at(ke, re)) : 0.f);
      }
    }
  }
}

// fp32 FMA: thread (tm, tn) of a 16 x 16 grid owns rows tm + 16 i and columns tn + 16 j.
template <typename S, Major LA, Major LB>
struct FmaAccumulator {
  float acc[8][8] = {};
  __device__ void multiply(const S* a, const S* b) {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
    SIDEWAYS_UNROLL
    for (int k = 0; k < Tiling<S>::kStepK; ++k) {
      float av[8], bv[8];
      SIDEWAYS_UNROLL
      for (int i = 0; i < 8; ++i) av[i] = to_float(a[TileShape<S, LA, kTileM>::offset(k, tm + 16 * i)]);
      SIDEWAYS_UNROLL
      for (int j = 0; j < 8; ++j) bv[j] = to_float(b[TileShape<S, LB, kTileN>::offset(k, tn + 16 * j)]);
      SIDEWAYS_UNROLL
      for (int i = 0; i < 8; ++i)
        SIDEWAYS_UNROLL
        for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
  template <class Store>
  __device__ void store(float*, Store& put) const {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
    SIDEWAYS_UNROLL
    for (int i = 0; i < 8; ++i)
      SIDEWAYS_UNROLL
      for (int j = 0; j < 8; ++j) put(tm + 16 * i, tn + 16 * j, acc[i][j]);
  }
};

#if defined(SIDEWAYS_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SIDEWAYS_TENSOR_CORES 1
#else
#define SIDEWAYS_TENSOR_CORES 0
#endif

#if SIDEWAYS_TENSOR_CORES
// Tensor cores (wmma m16n16k16, fp32 accumulators): the 8 warps as 2 x 4, each owning a
// 64 x 32 piece of the tile in 4 x 2 fragments. Fragments are touched only through wmma
// calls; the epilogue goes through the warp's 16 x 16 fp32 scratch, one fragment at a time.
template <typename S, Major LA, Major LB>
struct TensorCoreAccumulator {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Acc acc[4][2];
  __device__ TensorCoreAccumulator() {
    for (auto& row : acc)
      for (auto& f : row) nvcuda::wmma::fill_fragment(f, 0.f);
  }
  __device__ void multiply(const S* a, const S* b) {
    namespace wmma = nvcuda::wmma;
    using ShapeA = TileShape<S, LA, kTileM>;
    using ShapeB = TileShape<S, LB, kTileN>;
    using LayoutA = typename std::conditional<LA == Major::kK, wmma::row_major, wmma::col_major>::type;
    using LayoutB = typename std::conditional<LB == Major::kK, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    SIDEWAYS_UNROLL
    for (int k = 0; k < Tiling<S>::kStepK; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, LayoutA> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, S, LayoutB> fb[2];
      SIDEWAYS_UNROLL
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], a + ShapeA::offset(k, wm * 64 + i * 16), ShapeA::kLead);
      SIDEWAYS_UNROLL
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + ShapeB::offset(k, wn * 32 + j * 16), ShapeB::kLead);
      SIDEWAYS_UNROLL
      for (int i = 0; i < 4; ++i)
        SIDEWAYS_UNROLL
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  template <class Store>
  __device__ void store(float* scratch, Store& put) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / 4, wn = warp % 4;
    float* mine = scratch + warp * 256;
    SIDEWAYS_UNROLL
    for (int i = 0; i < 4; ++i)
      SIDEWAYS_UNROLL
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(mine, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncthreads();  // every warp stores as many fragments: uniform, and emulated
        SIDEWAYS_UNROLL
        for (int e = lane; e < 256; e += 32) put(wm * 64 + i * 16 + e / 16, wn * 32 + j * 16 + e % 16, mine[e]);
        __syncthreads();
      }
  }
};
template <typename S, Major LA, Major LB>
using Accumulator = typename std::conditional<Tiling<S>::kTensorCores, TensorCoreAccumulator<S, LA, LB>,
                                              FmaAccumulator<S, LA, LB>>::type;
#else
template <typename S, Major LA, Major LB>
using Accumulator = FmaAccumulator<S, LA, LB>;
#endif

// The block's kTileM x kTileN tile of sum_k A(k, m0 + row) B(k, n0 + col) over k in
// [k_begin, k_end), handed to put(row, col, value) for every (row, col) of the tile (the
// caller bounds-checks). kStages - 1 steps are in flight while one is multiplied. `shared`
// holds Shared::kBytes (a SharedLayout).
template <class Shared, class OperandA, class OperandB, class Store>
__device__ void block_gemm(unsigned char* shared, int64_t k_begin, int64_t k_end, const OperandA& a,
                           const OperandB& b, int64_t m0, int64_t n0, Store put) {
  using S = typename Shared::S;
  using T = Tiling<S>;
  constexpr Major LA = Shared::LA, LB = Shared::LB;
  constexpr int kStageA = Shared::kStageA, kStageB = Shared::kStageB;
  S* tiles_a = reinterpret_cast<S*>(shared);
  S* tiles_b = tiles_a + T::kStages * kStageA;
  float* scratch = reinterpret_cast<float*>(shared + Shared::kTileBytes);
  const int64_t steps = k_end > k_begin ? (k_end - k_begin + T::kStepK - 1) / T::kStepK : 0;
  auto issue = [&](int64_t step) {  // an empty commit group past the last step keeps the count uniform
    if (step < steps) {
      const int stage = static_cast<int>(step % T::kStages);
      load_step<S, LA, kTileM>(tiles_a + stage * kStageA, a, k_begin + step * T::kStepK, k_end, m0);
      load_step<S, LB, kTileN>(tiles_b + stage * kStageB, b, k_begin + step * T::kStepK, k_end, n0);
    }
    __pipeline_commit();
  };
  for (int s = 0; s < T::kStages - 1; ++s) issue(s);
  Accumulator<S, LA, LB> acc;
  for (int64_t step = 0; step < steps; ++step) {
    __pipeline_wait_prior(T::kStages - 2);  // this thread's copies of `step` have landed
    __syncthreads();                        // everyone's have, and step - 1's buffer is free
    issue(step + T::kStages - 1);
    const int stage = static_cast<int>(step % T::kStages);
    acc.multiply(tiles_a + stage * kStageA, tiles_b + stage * kStageB);
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  acc.store(scratch, put);
}

// --- kernels. grid: (row tiles, column tiles, groups [x split_k for the weight update]).

// M = C_out/groups, N = (C/groups) * taps (tap-major), K = B*H_out*W_out.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_update_kernel(const __grid_constant__ WeightUpdateArgs a, const T* __restrict__ grad_out,
                                                                 const T* __restrict__ ring, bool error_vectorised,
                                                                 bool ring_vectorised) {
  SIDEWAYS_DYNAMIC_SHARED(shared);
  const ConvGeometry& g = a.g;
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups, taps = g.k_t * g.k_h * g.k_w;
  const int64_t n_cols = cg * taps, k_total = g.batch * g.out_height * g.out_width;
  const int64_t group = blockIdx.z % g.groups, split = blockIdx.z / g.groups;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM, n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t steps = (k_total + Tiling<T>::kStepK - 1) / Tiling<T>::kStepK;
  const int64_t per_split = (steps + a.split_k - 1) / a.split_k * Tiling<T>::kStepK;
  const int64_t k_begin = split * per_split, k_end = k_begin + per_split < k_total ? k_begin + per_split : k_total;
  const ErrorByPixel<T> error{g, grad_out, group, mg, error_vectorised};
  const Window<T, true> window{g, ring, group, cg, taps, ring_vectorised};
  auto apply = [&](int64_t m, int64_t n, float d) {  // the epilogue of weight element (m, n)
    if (m >= mg || n >= n_cols) return;
    const int64_t w = ((group * mg + m) * cg + n % cg) * taps + n / cg;
    if (a.mode == WeightUpdateMode::kAccumulate) {
      a.grad_weight[w] += d;
      return;
    }
    if (a.weight_decay != 0.f) d += a.weight_decay * a.weight[w];
    if (a.momentum_buffer != nullptr) {
      const float v = a.first_step ? d : a.momentum * a.momentum_buffer[w] + (1.f - a.dampening) * d;
      a.momentum_buffer[w] = v;
      d = a.nesterov ? d + a.momentum * v : v;
    }
    a.weight[w] -= a.lr * d;
  };
  if (a.split_k == 1) {
    block_gemm<UpdateShared<T>>(shared, k_begin, k_end, error, window, m0, n0,
                                              [&](int r, int c, float v) { apply(m0 + r, n0 + c, v); });
    return;
  }
  // Split-K: every split writes its partial tile; the last to finish sums them in split order
  // (the same sums whoever is last) and applies the epilogue. No block waits for another.
  const int64_t tile = (group * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  float* partials = a.partials + tile * a.split_k * kTileM * kTileN;
  block_gemm<UpdateShared<T>>(
      shared, k_begin, k_end, error, window, m0, n0,
      [&](int r, int c, float v) { partials[split * kTileM * kTileN + r * kTileN + c] = v; });
  __shared__ int last;
  __threadfence();  // this block's partials are visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + tile, 1) == a.split_k - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < kTileM * kTileN; e += kThreads) {
    float d = 0.f;
    for (int64_t s = 0; s < a.split_k; ++s) d += __ldcg(partials + s * kTileM * kTileN + e);
    apply(m0 + e / kTileN, n0 + e % kTileN, d);
  }
  if (threadIdx.x == 0) a.counters[tile] = 0;  // ready for the next launch
}

// M = B*H_out*W_out output pixels, N = C_out/groups, K = taps * (C/groups) (tap-major).
template <typename T>
__global__ void __launch_bounds__(kThreads) ring_conv_forward_kernel(const __grid_constant__ ConvGeometry g, const T* __restrict__ ring,
                                                                     const T* __restrict__ weight,
                                                                     const float* __restrict__ bias,
                                                                     T* __restrict__ out, bool ring_vectorised,
                                                                     bool weight_vectorised) {
  SIDEWAYS_DYNAMIC_SHARED(shared);
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups, taps = g.k_t * g.k_h * g.k_w;
  const int64_t hw_out = g.out_height * g.out_width, m_total = g.batch * hw_out;
  const int64_t group = blockIdx.z, m0 = static_cast<int64_t>(blockIdx.x) * kTileM, n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const Window<T, false> window{g, ring, group, cg, taps, ring_vectorised};
  const RowsAlongK<T> w{weight, group, mg, cg * taps, weight_vectorised};
  block_gemm<ConvShared<T>>(shared, 0, cg * taps, window, w, m0, n0, [&](int r, int c, float v) {
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= m_total || n >= mg) return;
    const int64_t b = m / hw_out, yx = m % hw_out, co = group * mg + n;
    out[b * g.out_strides[0] + co * g.out_strides[1] + (yx / g.out_width) * g.out_strides[2] +
        (yx % g.out_width) * g.out_strides[3]] = from_float<T>(v + (bias != nullptr ? bias[co] : 0.f));
  });
}

// M = B*H*W input pixels, N = C/groups, K = k_h*k_w * (C_out/groups) (tap-major).
template <typename T>
__global__ void __launch_bounds__(kThreads) window_input_grad_kernel(const __grid_constant__ ConvGeometry g, const T* __restrict__ grad_out,
                                                                     const T* __restrict__ summed,
                                                                     T* __restrict__ grad_in, InStrides in,
                                                                     bool error_vectorised, bool summed_vectorised) {
  SIDEWAYS_DYNAMIC_SHARED(shared);
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups, khw = g.k_h * g.k_w;
  const int64_t hw = g.height * g.width, m_total = g.batch * hw;
  const int64_t group = blockIdx.z, m0 = static_cast<int64_t>(blockIdx.x) * kTileM, n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const ErrorReaching<T> error{g, grad_out, group, mg, error_vectorised};
  const RowsAlongK<T> s{summed, group, cg, mg * khw, summed_vectorised};
  block_gemm<ConvShared<T>>(shared, 0, mg * khw, error, s, m0, n0, [&](int r, int c, float v) {
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= m_total || n >= cg) return;
    const int64_t b = m / hw, y = (m % hw) / g.width, x = m % g.width;
    grad_in[b * in.s[0] + (group * cg + n) * in.s[1] + y * in.s[2] + x * in.s[3]] = from_float<T>(v);
  });
}

// --- launches

static cudaError_t device_attribute(cudaDeviceAttr attr, int* value) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err != cudaSuccess ? err : cudaDeviceGetAttribute(value, attr, device);
}

// The grid of a rows x cols x z problem: row tiles on x (up to 2^31 - 1 blocks: the B*H*W
// pixels of a large batch), column tiles on y and groups (x splits) on z. Checked against
// the current device's limits (read from it): cudaErrorInvalidConfiguration before anything
// is launched when it does not fit.
static cudaError_t grid_for(int64_t rows, int64_t cols, int64_t z, dim3* grid) {
  int max_x = 0, max_y = 0, max_z = 0;
  cudaError_t err = device_attribute(cudaDevAttrMaxGridDimX, &max_x);
  if (err == cudaSuccess) err = device_attribute(cudaDevAttrMaxGridDimY, &max_y);
  if (err == cudaSuccess) err = device_attribute(cudaDevAttrMaxGridDimZ, &max_z);
  if (err != cudaSuccess) return err;
  const int64_t x = (rows + kTileM - 1) / kTileM, y = (cols + kTileN - 1) / kTileN;
  if (x > max_x || y > max_y || z > max_z || rows <= 0 || cols <= 0 || z <= 0) {
    return cudaErrorInvalidConfiguration;
  }
  *grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
  return cudaSuccess;
}

// Whether an operand with these strides, whose contiguous axis is `axis` and runs over
// `channels` per group (per row, for a weight), can be read as 16-byte vectors of `vector`
// elements that never straddle a group (or a row).
static bool vectorisable(const void* p, const int64_t* strides, int dims, int axis, int64_t channels, int vector) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || strides[axis] != 1 || channels % vector != 0) return false;
  for (int d = 0; d < dims; ++d)
    if (d != axis && strides[d] % vector != 0) return false;
  return true;
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

// Raises the kernel's dynamic shared memory limit to what its tiles need, then launches.
#define SIDEWAYS_LAUNCH_TILED(kernel, Shared, grid, stream, ...)                                        \
  do {                                                                                                  \
    const cudaError_t attr_err =                                                                        \
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shared::kBytes);      \
    if (attr_err != cudaSuccess) return attr_err;                                                       \
    SIDEWAYS_LAUNCH(kernel, grid, kThreads, Shared::kBytes, stream, __VA_ARGS__);                       \
  } while (0)

cudaError_t plan_weight_update(const ConvGeometry& g, DType dtype, int64_t split_k, WeightUpdatePlan* plan) {
  int sms = 0;
  if (const cudaError_t err = device_attribute(cudaDevAttrMultiProcessorCount, &sms)) return err;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    const int64_t mg = g.out_channels / g.groups, n_cols = (g.channels / g.groups) * g.k_t * g.k_h * g.k_w;
    const int64_t tiles = (mg + kTileM - 1) / kTileM * ((n_cols + kTileN - 1) / kTileN) * g.groups;
    const int64_t steps = (g.batch * g.out_height * g.out_width + Tiling<T>::kStepK - 1) / Tiling<T>::kStepK;
    int64_t s = split_k;
    if (s <= 0) {  // up to two waves of one block per SM (their registers allow one), >= 4 steps each
      s = (2 * sms) / (tiles > 0 ? tiles : 1);
      if (s > steps / 4) s = steps / 4;
    }
    if (s > steps) s = steps;
    if (s > 1) {
      const int64_t per_split = (steps + s - 1) / s;
      s = (steps + per_split - 1) / per_split;  // no split left without a step
    } else {
      s = 1;
    }
    plan->split_k = s;
    plan->partial_floats = s > 1 ? tiles * s * kTileM * kTileN : 0;
    plan->counters = s > 1 ? tiles : 0;
    return cudaSuccess;
  });
}

cudaError_t weight_update(const WeightUpdateArgs& a, DType dtype, const void* grad_out, const void* ring,
                          cudaStream_t stream) {
  const ConvGeometry& g = a.g;
  if (a.split_k < 1 || (a.split_k > 1 && (a.partials == nullptr || a.counters == nullptr))) {
    return cudaErrorInvalidValue;
  }
  dim3 grid;
  const int64_t cg = g.channels / g.groups, mg = g.out_channels / g.groups;
  if (const cudaError_t err = grid_for(mg, cg * g.k_t * g.k_h * g.k_w, g.groups * a.split_k, &grid)) return err;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int v = Tiling<T>::kVector;
    const bool error_vec = vectorisable(grad_out, g.out_strides, 4, 1, mg, v);
    const bool ring_vec = vectorisable(ring, g.ring_strides, 5, 2, cg, v);
    SIDEWAYS_LAUNCH_TILED(weight_update_kernel<T>, UpdateShared<T>, grid, stream, a, static_cast<const T*>(grad_out),
                          static_cast<const T*>(ring), error_vec, ring_vec);
    return cudaGetLastError();
  });
}

cudaError_t ring_conv_forward(const ConvGeometry& g, DType dtype, const void* ring, const void* weight,
                              const float* bias, void* out, cudaStream_t stream) {
  dim3 grid;
  if (const cudaError_t err =
          grid_for(g.batch * g.out_height * g.out_width, g.out_channels / g.groups, g.groups, &grid)) {
    return err;
  }
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int v = Tiling<T>::kVector;
    const int64_t cg = g.channels / g.groups, k_total = cg * g.k_t * g.k_h * g.k_w, weight_strides[2] = {k_total, 1};
    const bool ring_vec = vectorisable(ring, g.ring_strides, 5, 2, cg, v);
    const bool weight_vec = vectorisable(weight, weight_strides, 2, 1, k_total, v);
    SIDEWAYS_LAUNCH_TILED(ring_conv_forward_kernel<T>, ConvShared<T>, grid, stream, g, static_cast<const T*>(ring),
                          static_cast<const T*>(weight), bias, static_cast<T*>(out), ring_vec, weight_vec);
    return cudaGetLastError();
  });
}

cudaError_t window_input_grad(const ConvGeometry& g, DType dtype, const void* grad_out, const void* summed_weight,
                              void* grad_in, const int64_t* in_strides, cudaStream_t stream) {
  const InStrides in{{in_strides[0], in_strides[1], in_strides[2], in_strides[3]}};
  dim3 grid;
  if (const cudaError_t err = grid_for(g.batch * g.height * g.width, g.channels / g.groups, g.groups, &grid)) {
    return err;
  }
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int v = Tiling<T>::kVector;
    const int64_t mg = g.out_channels / g.groups, summed_strides[2] = {mg * g.k_h * g.k_w, 1};
    const bool error_vec = vectorisable(grad_out, g.out_strides, 4, 1, mg, v);
    const bool summed_vec = vectorisable(summed_weight, summed_strides, 2, 1, summed_strides[0], v);
    SIDEWAYS_LAUNCH_TILED(window_input_grad_kernel<T>, ConvShared<T>, grid, stream, g, static_cast<const T*>(grad_out),
                          static_cast<const T*>(summed_weight), static_cast<T*>(grad_in), in, error_vec, summed_vec);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace sideways
