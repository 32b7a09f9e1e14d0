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
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
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

// y[j] += alpha·x[j].
template <typename T>
FI_INLINE void axpy(T alpha, const T* x, T* y, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    y[j] += alpha * x[j];
  }
}

}  // namespace fastinfluence
