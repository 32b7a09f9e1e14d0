// CUDA kernels of the per-sample gradient ops of Linear and Conv2d (unfold form) and of their
// dot products with v (layouts as in ops/per_sample_grad_common.h). No torch headers.
// Gradients: one thread per output entry. Dots: one block per sample, each thread forming the
// gradient entries it owns on the fly, then a block reduction; no gradient is stored.
#include "ops/cuda/launchers.h"
#include "ops/cuda/reduce.cuh"

namespace fastinfluence {
namespace cuda {
namespace {

// G[n][o][i] = Σ_s g[n][s][o] x[n][s][i].
template <typename T>
__device__ __forceinline__ T linear_entry(const T* x, const T* g, int64_t S, int64_t in,
                                          int64_t out, int64_t o, int64_t i) {
  T total = 0;
  for (int64_t s = 0; s < S; ++s) {
    total += g[s * out + o] * x[s * in + i];
  }
  return total;
}

// G[n][c][k] = Σ_l g[n][c][l] x[n][k][l].
template <typename T>
__device__ __forceinline__ T conv2d_entry(const T* x, const T* g, int64_t L, int64_t c,
                                          int64_t k) {
  T total = 0;
  for (int64_t l = 0; l < L; ++l) {
    total += g[c * L + l] * x[k * L + l];
  }
  return total;
}

template <typename T>
__global__ void linear_grad_kernel(const T* x, const T* g, int64_t n, int64_t S, int64_t in,
                                   int64_t out, T* G) {
  const int64_t total = n * out * in;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = e / (out * in), o = (e / in) % out, i = e % in;
    G[e] = linear_entry(x + sample * S * in, g + sample * S * out, S, in, out, o, i);
  }
}

template <typename T>
__global__ void linear_grad_dot_kernel(const T* x, const T* g, const T* v, int64_t S,
                                       int64_t in, int64_t out, T* dots) {
  __shared__ T scratch[kWarpsPerBlock];
  const int64_t sample = blockIdx.x;
  T partial = 0;
  for (int64_t e = threadIdx.x; e < out * in; e += blockDim.x) {
    partial += v[e] * linear_entry(x + sample * S * in, g + sample * S * out, S, in, out,
                                   e / in, e % in);
  }
  const T total = block_sum(partial, scratch);
  if (threadIdx.x == 0) {
    dots[sample] = total;
  }
}

template <typename T>
__global__ void conv2d_grad_kernel(const T* x, const T* g, int64_t n, int64_t K, int64_t L,
                                   int64_t C_out, T* G) {
  const int64_t total = n * C_out * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = e / (C_out * K), c = (e / K) % C_out, k = e % K;
    G[e] = conv2d_entry(x + sample * K * L, g + sample * C_out * L, L, c, k);
  }
}

template <typename T>
__global__ void conv2d_grad_dot_kernel(const T* x, const T* g, const T* v, int64_t K,
                                       int64_t L, int64_t C_out, T* dots) {
  __shared__ T scratch[kWarpsPerBlock];
  const int64_t sample = blockIdx.x;
  T partial = 0;
  for (int64_t e = threadIdx.x; e < C_out * K; e += blockDim.x) {
    partial += v[e] * conv2d_entry(x + sample * K * L, g + sample * C_out * L, L, e / K, e % K);
  }
  const T total = block_sum(partial, scratch);
  if (threadIdx.x == 0) {
    dots[sample] = total;
  }
}

}  // namespace

template <typename T>
void linear_per_sample_grad(const T* x, const T* g, int64_t n, int64_t S, int64_t in,
                            int64_t out, T* G, cudaStream_t stream) {
  if (n * out * in == 0) {
    return;
  }
  linear_grad_kernel<T><<<blocks_for(n * out * in, kBlockThreads), kBlockThreads, 0, stream>>>(
      x, g, n, S, in, out, G);
}

template <typename T>
void linear_per_sample_grad_dot(const T* x, const T* g, const T* v, int64_t n, int64_t S,
                                int64_t in, int64_t out, T* dots, cudaStream_t stream) {
  for (int64_t first = 0; first < n; first += 65535) {
    const int64_t samples = n - first < 65535 ? n - first : 65535;
    linear_grad_dot_kernel<T><<<static_cast<unsigned>(samples), kBlockThreads, 0, stream>>>(
        x + first * S * in, g + first * S * out, v, S, in, out, dots + first);
  }
}

template <typename T>
void conv2d_per_sample_grad(const T* x, const T* g, int64_t n, int64_t K, int64_t L,
                            int64_t C_out, T* G, cudaStream_t stream) {
  if (n * C_out * K == 0) {
    return;
  }
  conv2d_grad_kernel<T><<<blocks_for(n * C_out * K, kBlockThreads), kBlockThreads, 0, stream>>>(
      x, g, n, K, L, C_out, G);
}

template <typename T>
void conv2d_per_sample_grad_dot(const T* x, const T* g, const T* v, int64_t n, int64_t K,
                                int64_t L, int64_t C_out, T* dots, cudaStream_t stream) {
  for (int64_t first = 0; first < n; first += 65535) {
    const int64_t samples = n - first < 65535 ? n - first : 65535;
    conv2d_grad_dot_kernel<T><<<static_cast<unsigned>(samples), kBlockThreads, 0, stream>>>(
        x + first * K * L, g + first * C_out * L, v, K, L, C_out, dots + first);
  }
}

#define FI_INSTANTIATE_PER_SAMPLE(T)                                                           \
  template void linear_per_sample_grad<T>(const T*, const T*, int64_t, int64_t, int64_t,      \
                                          int64_t, T*, cudaStream_t);                         \
  template void linear_per_sample_grad_dot<T>(const T*, const T*, const T*, int64_t, int64_t, \
                                              int64_t, int64_t, T*, cudaStream_t);            \
  template void conv2d_per_sample_grad<T>(const T*, const T*, int64_t, int64_t, int64_t,      \
                                          int64_t, T*, cudaStream_t);                         \
  template void conv2d_per_sample_grad_dot<T>(const T*, const T*, const T*, int64_t, int64_t, \
                                              int64_t, int64_t, T*, cudaStream_t);
FI_INSTANTIATE_PER_SAMPLE(float)
FI_INSTANTIATE_PER_SAMPLE(double)
#undef FI_INSTANTIATE_PER_SAMPLE

}  // namespace cuda
}  // namespace fastinfluence
