// Host emulation of the CUDA subset our kernels use, so the very same .cu source is
// compiled by a host C++ compiler (with -DSIDEWAYS_EMULATE) and checked against
// sideways_kernels/reference.py on machines without a GPU.
//
// Model: blocks run one after another; the threads of a block run as host threads
// that meet at a barrier in __syncthreads(). __shared__ becomes a function-local
// static, shared by the block's threads (and reused by the next block, as on a GPU
// where shared memory is not initialised). Launch errors a GPU would report
// (too many threads, grid too large) come back from cudaGetLastError().
// Warp matrix multiply-accumulate (nvcuda::wmma, m16n16k16), the cp.async pipeline
// primitives (a plain copy that has landed at once), dynamic shared memory, atomicAdd and
// __threadfence are emulated below; TMA, wgmma and warp shuffles are not: a kernel using
// them keeps a plain path for this, and says so in its test.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __grid_constant__
#define SIDEWAYS_UNROLL

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };

namespace sideways_emu {

class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_, arrived_ = 0, generation_ = 0;
};

inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline Barrier* block_barrier = nullptr;
inline cudaError_t last_error = cudaSuccess;
inline std::vector<unsigned char> dynamic_shared;  // the launch's dynamic shared memory, block after block
inline std::atomic<int64_t> async_copies{0};       // 16-byte cp.async copies issued (tests read it)

// kernel<<<grid, block>>>(args) becomes launch(grid, block, [&] { kernel(args); }).
// The dynamic shared memory must have been allowed (cudaFuncSetAttribute) up to an H100's 227 KiB.
template <class Body>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Body body) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y > 65535 || grid.z > 65535 || grid.y == 0 ||
      grid.z == 0 || shared_bytes > 227 * 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  dynamic_shared.assign(shared_bytes, 0xff);  // not zeroed on a GPU either
  block_dim = block;
  grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Barrier barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([=] {
            block_index = dim3(bx, by, bz);
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            body();
          });
        }
        for (auto& th : pool) th.join();
        block_barrier = nullptr;
      }
}

}  // namespace sideways_emu

#define threadIdx (::sideways_emu::thread_index)
#define blockIdx (::sideways_emu::block_index)
#define blockDim (::sideways_emu::block_dim)
#define gridDim (::sideways_emu::grid_dim)

inline void __syncthreads() { sideways_emu::block_barrier->wait(); }

#define SIDEWAYS_DYNAMIC_SHARED(name) unsigned char* name = ::sideways_emu::dynamic_shared.data()

// cp.async through the pipeline primitives (cuda_pipeline.h): copied at once, so every wait
// finds it landed; __syncthreads() still orders it for the other threads, as on a GPU.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zero_fill = 0) {
  std::memcpy(dst, src, bytes - zero_fill);
  std::memset(static_cast<char*>(dst) + (bytes - zero_fill), 0, zero_fill);
  ++sideways_emu::async_copies;
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// The device's limits, as an H100 reports them.
enum cudaDeviceAttr {
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMultiProcessorCount = 16
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxGridDimX ? 2147483647 : attr == cudaDevAttrMultiProcessorCount ? 132 : 65535;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = sideways_emu::last_error;
  sideways_emu::last_error = cudaSuccess;
  return e;
}

// Storage-only half types with the conversions the kernels use (IEEE binary16, bfloat16).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float __half2float(__half v) {
  const uint32_t sign = (v.bits & 0x8000u) << 16, exponent = (v.bits >> 10) & 0x1f, mantissa = v.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = mantissa;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400u) == 0);
    u = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> 16-bit, rounding to nearest even as the CUDA intrinsics do.
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(x >> 16)};
}

inline __half __float2half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, mantissa = x & 0x7fffffu;
  const int32_t biased = static_cast<int32_t>((x >> 23) & 0xffu);
  if (biased == 0xff) return {static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0u))};
  const int32_t exponent = biased - 127 + 15;
  if (exponent >= 31) return {static_cast<uint16_t>(sign | 0x7c00u)};  // overflow: inf
  if (exponent <= 0) {  // subnormal half (or zero)
    if (exponent < -10) return {static_cast<uint16_t>(sign)};
    const uint32_t m = mantissa | 0x800000u;
    const int shift = 14 - exponent;
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u), half_way = 1u << (shift - 1);
    if (rest > half_way || (rest == half_way && (h & 1u))) ++h;
    return {static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = sign | (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry correctly bumps the exponent
  return {static_cast<uint16_t>(h)};
}

inline float __half2float_any(float v) { return v; }
inline float __half2float_any(__half v) { return __half2float(v); }
inline float __half2float_any(__nv_bfloat16 v) { return __bfloat162float(v); }

// Warp matrix multiply-accumulate (nvcuda::wmma), the m16n16k16 shape with fp32 accumulators.
// On a GPU each lane holds a share of a fragment that only load/fill/mma/store see; here
// every thread of the warp holds the whole fragment and computes it (the same values), and
// lane 0 alone stores it. A kernel that touches fragments only through these calls (never
// their elements) therefore computes here what it computes on tensor cores, up to the order
// of the fp32 sums.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  float x[16][16];  // [row][column] of the fragment's matrix (A: M x K, B: K x N, C: M x N)
};

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = __half2float_any(std::is_same<Layout, col_major>::value ? p[c * ldm + r] : p[r * ldm + c]);
}

template <class T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[m][n];
      for (int k = 0; k < 16; ++k) sum += a.x[m][k] * b.x[k][n];
      out[m][n] = sum;
    }
  std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (::sideways_emu::thread_index.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r][c];
}
}  // namespace wmma
}  // namespace nvcuda

#define SIDEWAYS_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sideways_emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
