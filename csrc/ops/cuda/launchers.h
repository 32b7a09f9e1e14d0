// Host entry points of the CUDA kernels: raw pointers and a cudaStream_t, no torch headers, so
// the .cu files compile with nvcc on machines whose torch has no CUDA headers. The glue files
// (*_glue.cpp) check and convert tensors, then call these. All arrays are contiguous row-major;
// T is float or double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastinfluence {
namespace cuda {

// The head kernels keep one row's C residuals in shared memory: C must not exceed this.
constexpr int64_t kHeadMaxClassesCuda = 64;

// Unnormalised head HVP over `count` rows (rows[0..count), or 0..count when rows is null):
// sum_w [C, d] ← Σ r_i a_iᵀ, sum_b [C] ← Σ r_i (skipped when null). workspace holds
// head_hvp_workspace_size(C, d) elements.
int64_t head_hvp_workspace_size(int64_t C, int64_t d);
template <typename T>
void head_hvp_sum(const T* A, const T* P, const T* Vw, const T* Vb, const int64_t* rows,
                  int64_t count, int64_t C, int64_t d, T* sum_w, T* sum_b, T* workspace,
                  cudaStream_t stream);

// out = scale_sum·sum + scale_v·v, elementwise over len entries.
template <typename T>
void combine(const T* sum, const T* v, T scale_sum, T scale_v, int64_t len, T* out,
             cudaStream_t stream);

// scores[i] = −(p_i − onehot(y_i))ᵀ (Sw a_i + Sb); NaN where y_i is not in [0, C).
template <typename T>
void head_scores(const T* A, const T* P, const int64_t* y, const T* Sw, const T* Sb, int64_t n,
                 int64_t C, int64_t d, T* scores, cudaStream_t stream);

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
