// Host entry points of the CUDA kernels: raw pointers and a cudaStream_t, no torch headers, so
// the .cu files compile with nvcc on machines whose torch has no CUDA headers. The glue files
// (*_glue.cpp) check and convert tensors, then call these. All arrays are contiguous row-major;
// T is float or double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastinfluence {
namespace cuda {

// The head kernels keep one row's C values per direction in shared memory: C must not exceed
// this.
constexpr int64_t kHeadMaxClassesCuda = 64;

// First pass of the head HVP for k directions Vw [k·C, d], Vb [k·C] (may be null):
// R [n, k·C] with R[i, j·C + c] = (p_i⊙u − p_i (p_iᵀu))_c, u = Vw[j] a_i + Vb[j].
template <typename T>
void head_residuals(const T* A, const T* P, const T* Vw, const T* Vb, int64_t n, int64_t k,
                    int64_t C, int64_t d, T* R, cudaStream_t stream);

// scores [n, k], scores[i, j] = −(p_i − onehot(y_i))ᵀ (Sw[j] a_i + Sb[j]); rows whose label
// is not in [0, C) get NaN and are counted into *bad_labels (device memory, zeroed by the
// caller).
template <typename T>
void head_scores(const T* A, const T* P, const int64_t* y, const T* Sw, const T* Sb, int64_t n,
                 int64_t k, int64_t C, int64_t d, T* scores, int* bad_labels,
                 cudaStream_t stream);

// h ← g + keep·h − hv·inv_scale over len entries.
template <typename T>
void lissa_update(T* h, const T* g, const T* hv, int64_t len, T keep, T inv_scale,
                  cudaStream_t stream);

// rows[k] = lissa_row(seed, step, batch, k, n) for k < batch.
void lissa_rows(int64_t seed, int64_t step, int64_t batch, int64_t n, int64_t* rows,
                cudaStream_t stream);

// Per-sample gradients and their dots with v (layouts as in per_sample_grad_common.h).
template <typename T>
void linear_per_sample_grad(const T* x, const T* g, int64_t n, int64_t S, int64_t in,
                            int64_t out, T* G, cudaStream_t stream);
template <typename T>
void linear_per_sample_grad_dot(const T* x, const T* g, const T* v, int64_t n, int64_t S,
                                int64_t in, int64_t out, T* dots, cudaStream_t stream);
template <typename T>
void conv2d_per_sample_grad(const T* x, const T* g, int64_t n, int64_t K, int64_t L,
                            int64_t C_out, T* G, cudaStream_t stream);
template <typename T>
void conv2d_per_sample_grad_dot(const T* x, const T* g, const T* v, int64_t n, int64_t K,
                                int64_t L, int64_t C_out, T* dots, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastinfluence
