// CUDA kernels of the softmax-CE head ops (math in ops/head_common.h). No torch headers.
//
// HVP: a fixed grid of kHvpBlocks blocks splits the rows; each block streams its rows of A
// once, computing a row's residual r (block reductions of the C dot products) and adding
// r aᵀ into the block's private accumulator (shared memory when C·d fits, else global
// workspace) while the row is still in cache. A second kernel sums the block accumulators in a
// fixed order, so results are deterministic.
#include "ops/cuda/launchers.h"
#include "ops/cuda/reduce.cuh"
#include "ops/head_common.h"

namespace fastinfluence {
namespace cuda {
namespace {

constexpr int kHvpBlocks = 264;  // about two blocks per SM on A100/H100
constexpr int64_t kMaxClasses = kHeadMaxClassesCuda;
constexpr size_t kSharedAccumulatorBytes = 40 * 1024;

template <typename T>
__global__ void hvp_partial_kernel(const T* A, const T* P, const T* Vw, const T* Vb,
                                   const int64_t* rows, int64_t count, int64_t C, int64_t d,
                                   T* workspace, bool shared_accumulator) {
  extern __shared__ unsigned char shared_bytes[];
  __shared__ T scratch[kWarpsPerBlock];
  __shared__ T residual[kMaxClasses];
  const int64_t stride = C * d + C;
  T* block_out = workspace + blockIdx.x * stride;
  T* acc = shared_accumulator ? reinterpret_cast<T*>(shared_bytes) : block_out;
  for (int64_t j = threadIdx.x; j < stride; j += blockDim.x) {
    acc[j] = T(0);
  }
  __syncthreads();
  const int64_t begin = blockIdx.x * count / gridDim.x;
  const int64_t end = (blockIdx.x + 1) * count / gridDim.x;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t i = rows != nullptr ? rows[r] : r;
    const T* a = A + i * d;
    for (int64_t c = 0; c < C; ++c) {
      T partial = 0;
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        partial += Vw[c * d + j] * a[j];
      }
      const T u = block_sum(partial, scratch);
      if (threadIdx.x == 0) {
        residual[c] = u + (Vb != nullptr ? Vb[c] : T(0));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      head_residual(P + i * C, residual, C);
    }
    __syncthreads();
    for (int64_t c = 0; c < C; ++c) {
      const T rc = residual[c];
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        acc[c * d + j] += rc * a[j];
      }
    }
    if (threadIdx.x == 0) {
      for (int64_t c = 0; c < C; ++c) {
        acc[C * d + c] += residual[c];
      }
    }
    __syncthreads();  // residual is rewritten by the next row
  }
  __syncthreads();
  if (shared_accumulator) {
    for (int64_t j = threadIdx.x; j < stride; j += blockDim.x) {
      block_out[j] = acc[j];
    }
  }
}

template <typename T>
__global__ void sum_partials_kernel(const T* workspace, int64_t blocks, int64_t C, int64_t d,
                                    T* sum_w, T* sum_b) {
  const int64_t stride = C * d + C;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < stride;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T total = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      total += workspace[b * stride + e];
    }
    if (e < C * d) {
      sum_w[e] = total;
    } else if (sum_b != nullptr) {
      sum_b[e - C * d] = total;
    }
  }
}

template <typename T>
__global__ void combine_kernel(const T* sum, const T* v, T scale_sum, T scale_v, int64_t len,
                               T* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < len;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = scale_sum * sum[e] + scale_v * v[e];
  }
}

// One warp per row: C dot products by warp reductions, the score by lane 0.
template <typename T>
__global__ void scores_kernel(const T* A, const T* P, const int64_t* y, const T* Sw,
                              const T* Sb, int64_t n, int64_t C, int64_t d, T* scores) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarpSize) +
                   threadIdx.x / kWarpSize;
       i < n; i += warps) {
    const T* a = A + i * d;
    const int64_t label = y[i];
    T total = 0;
    for (int64_t c = 0; c < C; ++c) {
      T partial = 0;
      for (int64_t j = lane; j < d; j += kWarpSize) {
        partial += Sw[c * d + j] * a[j];
      }
      const T s = warp_sum(partial) + (Sb != nullptr ? Sb[c] : T(0));
      total += ((c == label) ? s : T(0)) - P[i * C + c] * s;
    }
    if (lane == 0) {
      scores[i] = (label < 0 || label >= C) ? T(0) / T(0) : total;
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

}  // namespace

int64_t head_hvp_workspace_size(int64_t C, int64_t d) { return kHvpBlocks * (C * d + C); }

template <typename T>
void head_hvp_sum(const T* A, const T* P, const T* Vw, const T* Vb, const int64_t* rows,
                  int64_t count, int64_t C, int64_t d, T* sum_w, T* sum_b, T* workspace,
                  cudaStream_t stream) {
  const size_t accumulator_bytes = static_cast<size_t>(C * d + C) * sizeof(T);
  const bool shared_accumulator = accumulator_bytes <= kSharedAccumulatorBytes;
  hvp_partial_kernel<T><<<kHvpBlocks, kBlockThreads, shared_accumulator ? accumulator_bytes : 0,
                          stream>>>(A, P, Vw, Vb, rows, count, C, d, workspace,
                                    shared_accumulator);
  sum_partials_kernel<T><<<blocks_for(C * d + C, kBlockThreads), kBlockThreads, 0, stream>>>(
      workspace, kHvpBlocks, C, d, sum_w, sum_b);
}

template <typename T>
void combine(const T* sum, const T* v, T scale_sum, T scale_v, int64_t len, T* out,
             cudaStream_t stream) {
  combine_kernel<T><<<blocks_for(len, kBlockThreads), kBlockThreads, 0, stream>>>(
      sum, v, scale_sum, scale_v, len, out);
}

template <typename T>
void head_scores(const T* A, const T* P, const int64_t* y, const T* Sw, const T* Sb, int64_t n,
                 int64_t C, int64_t d, T* scores, cudaStream_t stream) {
  scores_kernel<T><<<blocks_for(n, kWarpsPerBlock), kBlockThreads, 0, stream>>>(
      A, P, y, Sw, Sb, n, C, d, scores);
}

void lissa_rows(int64_t seed, int64_t step, int64_t batch, int64_t n, int64_t* rows,
                cudaStream_t stream) {
  rows_kernel<<<blocks_for(batch, kBlockThreads), kBlockThreads, 0, stream>>>(seed, step, batch,
                                                                              n, rows);
}

#define FI_INSTANTIATE_HEAD(T)                                                                  \
  template void head_hvp_sum<T>(const T*, const T*, const T*, const T*, const int64_t*, int64_t, \
                                int64_t, int64_t, T*, T*, T*, cudaStream_t);                   \
  template void combine<T>(const T*, const T*, T, T, int64_t, T*, cudaStream_t);              \
  template void head_scores<T>(const T*, const T*, const int64_t*, const T*, const T*, int64_t, \
                               int64_t, int64_t, T*, cudaStream_t);
FI_INSTANTIATE_HEAD(float)
FI_INSTANTIATE_HEAD(double)
#undef FI_INSTANTIATE_HEAD

}  // namespace cuda
}  // namespace fastinfluence
