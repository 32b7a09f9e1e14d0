// CUDA kernels of the softmax-CE head ops (math in ops/head_common.h). No torch headers.
//
// head_scores and the first pass of head_hvp share one shape: a warp per row of A (the grid
// sized to n, capped at the resident blocks, the rest by grid stride), the row's k·C dot
// products with the directions W [k·C, d] by warp reductions, W staged once per block in
// shared memory when it fits (else read through the read-only cache). head_scores then writes
// u_y − pᵀu per direction; head_hvp writes the residuals R [n, k·C], and the glue forms
// Rᵀ A / n + damping·V with one GEMM (cuBLAS reads A at bandwidth). So the HVP reads A twice;
// a single fused pass would need a [k·C, d] accumulator per block, which does not fit in
// registers or shared memory for the engine's sizes and costs more traffic in global memory.
#include "ops/cuda/launchers.h"
#include "ops/cuda/reduce.cuh"
#include "ops/head_common.h"

namespace fastinfluence {
namespace cuda {
namespace {

constexpr int64_t kMaxClasses = kHeadMaxClassesCuda;
// W is staged in shared memory up to this size, which keeps several blocks resident per SM.
constexpr size_t kStagedDirectionBytes = 32 * 1024;
// Classes whose dot products share each load of the row a.
constexpr int kClassTile = 4;
// Resident blocks per SM aimed at by the grid cap (8 warps each).
constexpr int kBlocksPerSm = 4;

// One warp, one row a [d] with probabilities p [C], direction j: u[c] (the warp's shared
// buffer) ← W[j·C + c]·a + b[j·C + c] for c < C; returns pᵀu (on every lane).
template <typename T>
__device__ __forceinline__ T row_direction(const T* __restrict__ a, const T* __restrict__ p,
                                           const T* W, const T* __restrict__ b, int64_t j,
                                           int64_t C, int64_t d, int lane, T* u) {
  for (int64_t c0 = 0; c0 < C; c0 += kClassTile) {
    const T* w = W + (j * C + c0) * d;
    const int64_t tile = C - c0 < kClassTile ? C - c0 : kClassTile;
    T partial[kClassTile] = {};
    for (int64_t e = lane; e < d; e += kWarpSize) {
      const T ae = a[e];
#pragma unroll
      for (int t = 0; t < kClassTile; ++t) {
        if (t < tile) {
          partial[t] += w[t * d + e] * ae;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kClassTile; ++t) {
      const T total = warp_sum(partial[t]);  // every lane takes part, also for t >= tile
      if (lane == 0 && t < tile) {
        u[c0 + t] = total + (b != nullptr ? b[j * C + c0 + t] : T(0));
      }
    }
  }
  __syncwarp();
  T pu = 0;
  for (int64_t c = lane; c < C; c += kWarpSize) {
    pu += p[c] * u[c];
  }
  return warp_sum(pu);
}

// kScores: out [n, k] scores, bad_labels += rows whose label is not in [0, C) (NaN scores).
// Else: out [n, k·C] residuals r = p⊙u − p (pᵀu).
template <typename T, bool kScores>
__global__ void head_rows_kernel(const T* __restrict__ A, const T* __restrict__ P,
                                 const int64_t* __restrict__ y, const T* __restrict__ W,
                                 const T* __restrict__ b, int64_t n, int64_t k, int64_t C,
                                 int64_t d, bool stage_directions, T* __restrict__ out,
                                 int* bad_labels) {
  extern __shared__ __align__(16) unsigned char staged_bytes[];
  __shared__ T u_buffers[kWarpsPerBlock][kMaxClasses];
  const int64_t kC = k * C;
  const T* directions = W;
  if (stage_directions) {
    T* staged = reinterpret_cast<T*>(staged_bytes);
    for (int64_t e = threadIdx.x; e < kC * d; e += blockDim.x) {
      staged[e] = W[e];
    }
    __syncthreads();
    directions = staged;
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  T* u = u_buffers[warp];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; i < n;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const T* a = A + i * d;
    const T* p = P + i * C;
    const int64_t label = kScores ? y[i] : 0;
    const bool label_ok = label >= 0 && label < C;
    for (int64_t j = 0; j < k; ++j) {
      const T pu = row_direction(a, p, directions, b, j, C, d, lane, u);
      if (kScores) {
        if (lane == 0) {
          out[i * k + j] = label_ok ? u[label] - pu : T(0) / T(0);
        }
      } else {
        for (int64_t c = lane; c < C; c += kWarpSize) {
          out[i * kC + j * C + c] = p[c] * (u[c] - pu);
        }
      }
      __syncwarp();  // u is rewritten by the next direction
    }
    if (kScores && lane == 0 && !label_ok) {
      atomicAdd(bad_labels, 1);
    }
  }
}

__global__ void rows_kernel(int64_t seed, int64_t step, int64_t batch, int64_t n,
                            int64_t* rows) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < batch;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    rows[k] = lissa_row(seed, step, batch, k, n);
  }
}

template <typename T, bool kScores>
void launch_head_rows(const T* A, const T* P, const int64_t* y, const T* W, const T* b,
                      int64_t n, int64_t k, int64_t C, int64_t d, T* out, int* bad_labels,
                      cudaStream_t stream) {
  const size_t direction_bytes = static_cast<size_t>(k * C * d) * sizeof(T);
  const bool stage = direction_bytes > 0 && direction_bytes <= kStagedDirectionBytes;
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int blocks = blocks_for(n, kWarpsPerBlock, static_cast<int64_t>(sms) * kBlocksPerSm);
  head_rows_kernel<T, kScores><<<blocks, kBlockThreads, stage ? direction_bytes : 0, stream>>>(
      A, P, y, W, b, n, k, C, d, stage, out, bad_labels);
}

}  // namespace

template <typename T>
void head_residuals(const T* A, const T* P, const T* Vw, const T* Vb, int64_t n, int64_t k,
                    int64_t C, int64_t d, T* R, cudaStream_t stream) {
  launch_head_rows<T, false>(A, P, nullptr, Vw, Vb, n, k, C, d, R, nullptr, stream);
}

template <typename T>
void head_scores(const T* A, const T* P, const int64_t* y, const T* Sw, const T* Sb, int64_t n,
                 int64_t k, int64_t C, int64_t d, T* scores, int* bad_labels,
                 cudaStream_t stream) {
  launch_head_rows<T, true>(A, P, y, Sw, Sb, n, k, C, d, scores, bad_labels, stream);
}

void lissa_rows(int64_t seed, int64_t step, int64_t batch, int64_t n, int64_t* rows,
                cudaStream_t stream) {
  rows_kernel<<<blocks_for(batch, kBlockThreads), kBlockThreads, 0, stream>>>(seed, step, batch,
                                                                              n, rows);
}

#define FI_INSTANTIATE_HEAD(T)                                                                  \
  template void head_residuals<T>(const T*, const T*, const T*, const T*, int64_t, int64_t,     \
                                  int64_t, int64_t, T*, cudaStream_t);                         \
  template void head_scores<T>(const T*, const T*, const int64_t*, const T*, const T*, int64_t, \
                               int64_t, int64_t, int64_t, T*, int*, cudaStream_t);
FI_INSTANTIATE_HEAD(float)
FI_INSTANTIATE_HEAD(double)
#undef FI_INSTANTIATE_HEAD

}  // namespace cuda
}  // namespace fastinfluence
