// Warp and block sum reductions for the CUDA kernels. No torch headers.
#pragma once

#include <cuda_runtime.h>

namespace fastinfluence {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;

// Sum over the lanes of a full warp; every lane gets the total.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sum over a block of kBlockThreads threads; every thread gets the total. `scratch` holds
// kWarpsPerBlock values in shared memory; all threads must call this.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarpsPerBlock; ++w) {
    total += scratch[w];
  }
  return total;
}

inline int blocks_for(int64_t work, int64_t per_block, int64_t max_blocks = 65535) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

}  // namespace cuda
}  // namespace fastinfluence
