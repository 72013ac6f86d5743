// Host emulation of the CUDA subset our kernels use, so the very same .cu source is
// compiled by a host C++ compiler (with -DSIDEWAYS_EMULATE) and checked against
// sideways_kernels/reference.py on machines without a GPU.
//
// Model: blocks run one after another; the threads of a block run as host threads
// that meet at a barrier in __syncthreads(). __shared__ becomes a function-local
// static, shared by the block's threads (and reused by the next block, as on a GPU
// where shared memory is not initialised). Launch errors a GPU would report
// (too many threads, grid too large) come back from cudaGetLastError().
// Tensor-core MMA, TMA, warp shuffles and atomics are not emulated: a kernel using
// them keeps a plain path for this, and says so in its test.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

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

// kernel<<<grid, block>>>(args) becomes launch(grid, block, [&] { kernel(args); }).
template <class Body>
void launch(dim3 grid, dim3 block, Body body) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y > 65535 || grid.z > 65535 || grid.y == 0 ||
      grid.z == 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
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

#define SIDEWAYS_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sideways_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })
