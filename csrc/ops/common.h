// Portability macros and vector helpers shared by the CPU and CUDA kernels. No torch headers:
// nvcc compiles this on machines whose torch has no CUDA headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FI_HOST_DEVICE __host__ __device__
#define FI_INLINE __forceinline__
#elif defined(__GNUC__)
#define FI_HOST_DEVICE
#define FI_INLINE inline __attribute__((always_inline))
#else
#define FI_HOST_DEVICE
#define FI_INLINE inline
#endif

// CPU entry points are compiled once per x86 vector ISA and picked at load time (GCC/Clang
// function multiversioning on glibc), so a portable build still uses AVX2/AVX-512.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FI_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FI_CPU_CLONES
#endif

namespace fastinfluence {

// Independent partial sums let the compiler vectorise host reductions without -ffast-math.
constexpr int kDotLanes = 32;

// Σ_j a[j]·b[j].
template <typename T>
FI_INLINE T dot(const T* a, const T* b, int64_t len) {
  T partial[kDotLanes] = {};
  int64_t j = 0;
  for (; j + kDotLanes <= len; j += kDotLanes) {
    for (int k = 0; k < kDotLanes; ++k) {
      partial[k] += a[j + k] * b[j + k];
    }
  }
  T total = 0;
  for (; j < len; ++j) {
    total += a[j] * b[j];
  }
  for (int k = 0; k < kDotLanes; ++k) {
    total += partial[k];
  }
  return total;
}

// Rows processed together by the blocked helpers below: each load of the shared operand serves
// kRowBlock rows, and their independent sums keep the FMA units busy. The four rows are
// spelled out so that the compiler keeps the partial sums in vector registers.
constexpr int kRowBlock = 4;  // dot_rows and axpy_rows spell out 4 rows
constexpr int kBlockLanes = 16;

// out[b] = Σ_j w[j]·x[b][j] for the kRowBlock rows x[b].
template <typename T>
FI_INLINE void dot_rows(const T* w, const T* const* x, int64_t len, T* out) {
  const T* x0 = x[0];
  const T* x1 = x[1];
  const T* x2 = x[2];
  const T* x3 = x[3];
  T p0[kBlockLanes] = {}, p1[kBlockLanes] = {}, p2[kBlockLanes] = {}, p3[kBlockLanes] = {};
  int64_t j = 0;
  for (; j + kBlockLanes <= len; j += kBlockLanes) {
    for (int k = 0; k < kBlockLanes; ++k) {
      const T wk = w[j + k];
      p0[k] += wk * x0[j + k];
      p1[k] += wk * x1[j + k];
      p2[k] += wk * x2[j + k];
      p3[k] += wk * x3[j + k];
    }
  }
  for (; j < len; ++j) {
    p0[0] += w[j] * x0[j];
    p1[0] += w[j] * x1[j];
    p2[0] += w[j] * x2[j];
    p3[0] += w[j] * x3[j];
  }
  out[0] = out[1] = out[2] = out[3] = T(0);
  for (int k = 0; k < kBlockLanes; ++k) {
    out[0] += p0[k];
    out[1] += p1[k];
    out[2] += p2[k];
    out[3] += p3[k];
  }
}

// y[j] += Σ_b alpha[b]·x[b][j] for the kRowBlock rows x[b].
template <typename T>
FI_INLINE void axpy_rows(const T* alpha, const T* const* x, T* y, int64_t len) {
  const T* x0 = x[0];
  const T* x1 = x[1];
  const T* x2 = x[2];
  const T* x3 = x[3];
  const T a0 = alpha[0], a1 = alpha[1], a2 = alpha[2], a3 = alpha[3];
  for (int64_t j = 0; j < len; ++j) {
    y[j] += a0 * x0[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j];
  }
}

// y[j] += alpha·x[j].
template <typename T>
FI_INLINE void axpy(T alpha, const T* x, T* y, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    y[j] += alpha * x[j];
  }
}

}  // namespace fastinfluence
