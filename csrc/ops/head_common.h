// Math of the softmax-cross-entropy head (docs/design.md §3 item 3), shared by the CPU and CUDA
// kernels. No torch headers.
//
// A [n, d] features, P [n, C] softmax probabilities, y [n] labels; the head is
// logits = A Wᵀ + b and the loss the mean softmax cross-entropy. For a direction (Vw, Vb):
//   u_i = Vw a_i + Vb,  r_i = p_i⊙u_i − p_i (p_iᵀ u_i),
//   H V = (Σ_i r_i a_iᵀ / n,  Σ_i r_i / n).
// The ops take k directions at once, Vw [k, C, d] and Vb [k, C]: read as k·C stacked rows of
// one [k·C, d] matrix, so one pass over A serves all k (u_i, r_i are then [k·C], one C-block per
// direction).
#pragma once

#include <cstdint>

#include "ops/common.h"

namespace fastinfluence {

// In place u ← p⊙u − p (pᵀu): one row's Hessian residual.
template <typename T>
FI_HOST_DEVICE FI_INLINE void head_residual(const T* p, T* u, int64_t C) {
  T pu = 0;
  for (int64_t c = 0; c < C; ++c) {
    pu += p[c] * u[c];
  }
  for (int64_t c = 0; c < C; ++c) {
    u[c] = p[c] * (u[c] - pu);
  }
}

// −(p − onehot(y))ᵀ s; NaN when y is not in [0, C).
template <typename T>
FI_HOST_DEVICE FI_INLINE T head_score(const T* p, const T* s, int64_t y, int64_t C) {
  if (y < 0 || y >= C) {
    return T(0) / T(0);
  }
  T total = s[y];
  for (int64_t c = 0; c < C; ++c) {
    total -= p[c] * s[c];
  }
  return total;
}

// Row of draw k in LiSSA step t: splitmix64(seed + (t·batch + k + 1)·φ) mod n. Counter-based,
// so every device (and the Python twin, twins.lissa_batch_indices) draws the same rows.
FI_HOST_DEVICE FI_INLINE int64_t lissa_row(int64_t seed, int64_t step, int64_t batch, int64_t k,
                                           int64_t n) {
  uint64_t z = static_cast<uint64_t>(seed) +
               (static_cast<uint64_t>(step) * static_cast<uint64_t>(batch) +
                static_cast<uint64_t>(k) + 1) *
                   0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  return static_cast<int64_t>(z % static_cast<uint64_t>(n));
}

// One LiSSA step for one entry: g + keep·h − hv·inv_scale, with keep = 1 − damping/scale.
template <typename T>
FI_HOST_DEVICE FI_INLINE T lissa_step(T g, T h, T hv, T keep, T inv_scale) {
  return g + keep * h - hv * inv_scale;
}

// Host: accumulates Σ r_i a_iᵀ into acc_w [k·C, d] and Σ r_i into acc_b [k·C] (if not null)
// for the k directions Vw [k·C, d], Vb [k·C] (may be null), over rows[begin..end) (or rows
// begin..end when rows is null). A and P are row-major with leading dimensions lda and ldp;
// u is scratch of kRowBlock·k·C entries. Rows go in blocks of kRowBlock so that each pass over
// Vw and acc_w serves several rows of A.
template <typename T>
FI_INLINE void head_hvp_rows(const T* A, int64_t lda, const T* P, int64_t ldp, const T* Vw,
                             const T* Vb, const int64_t* rows, int64_t begin, int64_t end,
                             int64_t k, int64_t C, int64_t d, T* u, T* acc_w, T* acc_b) {
  const int64_t kC = k * C;
  for (int64_t r = begin; r < end; r += kRowBlock) {
    const int rows_here = static_cast<int>(end - r < kRowBlock ? end - r : kRowBlock);
    // A short last block repeats its first row with a zero weight.
    const T* a[kRowBlock];
    int64_t index[kRowBlock];
    for (int b = 0; b < kRowBlock; ++b) {
      const int64_t at = r + (b < rows_here ? b : 0);
      index[b] = rows != nullptr ? rows[at] : at;
      a[b] = A + index[b] * lda;
    }
    T weight[kRowBlock];
    for (int64_t q = 0; q < kC; ++q) {
      dot_rows(Vw + q * d, a, d, weight);
      for (int b = 0; b < kRowBlock; ++b) {
        u[b * kC + q] = weight[b] + (Vb != nullptr ? Vb[q] : T(0));
      }
    }
    for (int b = 0; b < kRowBlock; ++b) {
      for (int64_t direction = 0; direction < k; ++direction) {
        head_residual(P + index[b] * ldp, u + b * kC + direction * C, C);
      }
    }
    for (int64_t q = 0; q < kC; ++q) {
      for (int b = 0; b < kRowBlock; ++b) {
        weight[b] = b < rows_here ? u[b * kC + q] : T(0);
        if (acc_b != nullptr) {
          acc_b[q] += weight[b];
        }
      }
      axpy_rows(weight, a, acc_w + q * d, d);
    }
  }
}

// Host: scores of rows begin..end along the k directions Sw [k·C, d], Sb [k·C] (may be null)
// into out [n, k] (row-major); s is scratch of kRowBlock·k·C entries. Returns how many labels
// were out of range (their k scores are NaN).
template <typename T>
FI_INLINE int64_t head_scores_rows(const T* A, int64_t lda, const T* P, int64_t ldp,
                                   const int64_t* y, const T* Sw, const T* Sb, int64_t begin,
                                   int64_t end, int64_t k, int64_t C, int64_t d, T* s, T* out) {
  const int64_t kC = k * C;
  int64_t bad_labels = 0;
  for (int64_t r = begin; r < end; r += kRowBlock) {
    const int rows_here = static_cast<int>(end - r < kRowBlock ? end - r : kRowBlock);
    const T* a[kRowBlock];
    for (int b = 0; b < kRowBlock; ++b) {
      a[b] = A + (r + (b < rows_here ? b : 0)) * lda;
    }
    T dots[kRowBlock];
    for (int64_t q = 0; q < kC; ++q) {
      dot_rows(Sw + q * d, a, d, dots);
      for (int b = 0; b < kRowBlock; ++b) {
        s[b * kC + q] = dots[b] + (Sb != nullptr ? Sb[q] : T(0));
      }
    }
    for (int b = 0; b < rows_here; ++b) {
      const int64_t i = r + b;
      bad_labels += (y[i] < 0 || y[i] >= C) ? 1 : 0;
      for (int64_t direction = 0; direction < k; ++direction) {
        out[i * k + direction] = head_score(P + i * ldp, s + b * kC + direction * C, y[i], C);
      }
    }
  }
  return bad_labels;
}

// Host: h[j] ← lissa_step(g[j], h[j], hv[j]) for j in [0, len).
template <typename T>
FI_INLINE void lissa_update_range(T* h, const T* g, const T* hv, int64_t len, T keep,
                                  T inv_scale) {
  for (int64_t j = 0; j < len; ++j) {
    h[j] = lissa_step(g[j], h[j], hv[j], keep, inv_scale);
  }
}

}  // namespace fastinfluence
