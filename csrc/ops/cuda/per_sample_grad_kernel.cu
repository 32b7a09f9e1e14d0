// CUDA kernels of the per-sample gradient ops of Linear and Conv2d (unfold form) and of their
// dot products with v (layouts as in ops/per_sample_grad_common.h). No torch headers.
// Linear: one thread per output entry (gradient) or per entry it owns (dot), the loads of x
// coalesced along `in`. Conv2d, where both operands run along L: the gradient is a tiled
// per-sample GEMM whose shared-memory tiles are loaded along L; the dot takes one block per
// sample, its threads over the positions l (coalesced), each forming (v x)[c, l] for a tile of
// output channels in registers. Dots store no gradient and end in a block reduction.
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

// Tile edge of the conv2d gradient GEMM: kGradTile² threads, one output entry each.
constexpr int kGradTile = 16;
// Output channels c whose (v x)[c, l] a thread of the conv2d dot keeps in registers.
constexpr int kDotClasses = 8;

// G[n] [C_out, K] = g[n] [C_out, L] · x[n]ᵀ; block (k tile, c tile, sample).
template <typename T>
__global__ void conv2d_grad_kernel(const T* __restrict__ x, const T* __restrict__ g, int64_t K,
                                   int64_t L, int64_t C_out, T* __restrict__ G) {
  __shared__ T g_tile[kGradTile][kGradTile + 1];  // +1: conflict-free column reads
  __shared__ T x_tile[kGradTile][kGradTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t sample = blockIdx.z;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGradTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kGradTile;
  const T* xs = x + sample * K * L;
  const T* gs = g + sample * C_out * L;
  T total = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kGradTile) {
    // Each tile row is kGradTile consecutive positions l of one class (one K row).
    const int64_t l = l0 + tx;
    g_tile[ty][tx] = (c0 + ty < C_out && l < L) ? gs[(c0 + ty) * L + l] : T(0);
    x_tile[ty][tx] = (k0 + ty < K && l < L) ? xs[(k0 + ty) * L + l] : T(0);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kGradTile; ++t) {
      total += g_tile[ty][t] * x_tile[tx][t];
    }
    __syncthreads();
  }
  if (c0 + ty < C_out && k0 + tx < K) {
    G[(sample * C_out + c0 + ty) * K + k0 + tx] = total;
  }
}

// dots[n] = Σ_{c,l} g[n][c][l] Σ_k v[c][k] x[n][k][l]; one block per sample.
template <typename T>
__global__ void conv2d_grad_dot_kernel(const T* __restrict__ x, const T* __restrict__ g,
                                       const T* __restrict__ v, int64_t K, int64_t L,
                                       int64_t C_out, T* __restrict__ dots) {
  __shared__ T scratch[kWarpsPerBlock];
  const int64_t sample = blockIdx.x;
  const T* xs = x + sample * K * L;
  const T* gs = g + sample * C_out * L;
  const int64_t tiles = (C_out + kDotClasses - 1) / kDotClasses;
  T partial = 0;
  for (int64_t e = threadIdx.x; e < tiles * L; e += blockDim.x) {
    const int64_t l = e % L, c0 = (e / L) * kDotClasses;
    T vx[kDotClasses] = {};
    for (int64_t k = 0; k < K; ++k) {
      const T xv = xs[k * L + l];
#pragma unroll
      for (int t = 0; t < kDotClasses; ++t) {
        if (c0 + t < C_out) {
          vx[t] += v[(c0 + t) * K + k] * xv;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kDotClasses; ++t) {
      if (c0 + t < C_out) {
        partial += gs[(c0 + t) * L + l] * vx[t];
      }
    }
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
  const dim3 threads(kGradTile, kGradTile);
  const auto k_tiles = static_cast<unsigned>((K + kGradTile - 1) / kGradTile);
  const auto c_tiles = static_cast<unsigned>((C_out + kGradTile - 1) / kGradTile);
  for (int64_t first = 0; first < n; first += 65535) {
    const int64_t samples = n - first < 65535 ? n - first : 65535;
    conv2d_grad_kernel<T><<<dim3(k_tiles, c_tiles, static_cast<unsigned>(samples)), threads, 0,
                            stream>>>(x + first * K * L, g + first * C_out * L, K, L, C_out,
                                      G + first * C_out * K);
  }
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
