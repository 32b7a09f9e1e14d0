// Per-sample weight gradients of Linear and Conv2d (unfold form), and their dot products with
// a fixed direction v, one sample at a time, shared by the CPU kernels and the C++ tests.
// No torch headers.
//
// Linear: x [S, in], g [S, out] (S = product of the sequence dims): G = Σ_s g[s]ᵀ x[s].
// Conv2d: x [K, L] unfolded input, g [C_out, L]: G[c, k] = Σ_l g[c, l] x[k, l].
#pragma once

#include <cstdint>

#include "ops/common.h"

namespace fastinfluence {

// out [out, in] ← Σ_s g[s]ᵀ x[s].
template <typename T>
FI_INLINE void linear_grad_sample(const T* x, const T* g, int64_t S, int64_t in, int64_t out,
                                  T* G) {
  for (int64_t j = 0; j < out * in; ++j) {
    G[j] = T(0);
  }
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t o = 0; o < out; ++o) {
      axpy(g[s * out + o], x + s * in, G + o * in, in);
    }
  }
}

// Σ_s g[s]ᵀ v x[s], with v [out, in].
template <typename T>
FI_INLINE T linear_grad_dot_sample(const T* x, const T* g, const T* v, int64_t S, int64_t in,
                                   int64_t out) {
  T total = 0;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t o = 0; o < out; ++o) {
      total += g[s * out + o] * dot(v + o * in, x + s * in, in);
    }
  }
  return total;
}

// G [C_out, K] ← g xᵀ.
template <typename T>
FI_INLINE void conv2d_grad_sample(const T* x, const T* g, int64_t K, int64_t L, int64_t C_out,
                                  T* G) {
  for (int64_t c = 0; c < C_out; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      G[c * K + k] = dot(g + c * L, x + k * L, L);
    }
  }
}

// Σ_{c,k} v[c, k] (g xᵀ)[c, k], with v [C_out, K].
template <typename T>
FI_INLINE T conv2d_grad_dot_sample(const T* x, const T* g, const T* v, int64_t K, int64_t L,
                                   int64_t C_out) {
  T total = 0;
  for (int64_t c = 0; c < C_out; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      total += v[c * K + k] * dot(g + c * L, x + k * L, L);
    }
  }
  return total;
}

}  // namespace fastinfluence
