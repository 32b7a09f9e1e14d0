// CUDA kernel of lissa_update_ (math in ops/head_common.h). No torch headers.
#include "ops/cuda/launchers.h"
#include "ops/cuda/reduce.cuh"
#include "ops/head_common.h"

namespace fastinfluence {
namespace cuda {
namespace {

template <typename T>
__global__ void lissa_update_kernel(T* h, const T* g, const T* hv, int64_t len, T keep,
                                    T inv_scale) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < len;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    h[e] = lissa_step(g[e], h[e], hv[e], keep, inv_scale);
  }
}

}  // namespace

template <typename T>
void lissa_update(T* h, const T* g, const T* hv, int64_t len, T keep, T inv_scale,
                  cudaStream_t stream) {
  if (len == 0) {
    return;
  }
  lissa_update_kernel<T><<<blocks_for(len, kBlockThreads), kBlockThreads, 0, stream>>>(
      h, g, hv, len, keep, inv_scale);
}

template void lissa_update<float>(float*, const float*, const float*, int64_t, float, float,
                                  cudaStream_t);
template void lissa_update<double>(double*, const double*, const double*, int64_t, double,
                                   double, cudaStream_t);

}  // namespace cuda
}  // namespace fastinfluence
