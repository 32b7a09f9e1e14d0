// CPU kernels of the softmax-CE head ops: head_hvp, head_scores, head_lissa, each for k
// directions (right-hand sides) per call. One pass over the features A per call (per LiSSA step):
// each row's k·C dot products and its rank-k·C update of the accumulator happen while the row
// is in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "ops/glue.h"
#include "ops/head_common.h"

namespace fastinfluence {
namespace {

// Rows per thread below which splitting the reduction does not pay.
constexpr int64_t kMinRowsPerChunk = 64;

template <typename T>
FI_CPU_CLONES void hvp_rows_kernel(const T* A, const T* P, const T* Vw, const T* Vb,
                                   const int64_t* rows, int64_t begin, int64_t end, int64_t k,
                                   int64_t C, int64_t d, T* u, T* acc_w, T* acc_b) {
  head_hvp_rows(A, d, P, C, Vw, Vb, rows, begin, end, k, C, d, u, acc_w, acc_b);
}

template <typename T>
FI_CPU_CLONES int64_t scores_rows_kernel(const T* A, const T* P, const int64_t* y, const T* Sw,
                                         const T* Sb, int64_t begin, int64_t end, int64_t k,
                                         int64_t C, int64_t d, T* s, T* out) {
  return head_scores_rows(A, d, P, C, y, Sw, Sb, begin, end, k, C, d, s, out);
}

// Unnormalised head Hessian times the k directions (Vw [k·C, d], Vb [k·C]) over `count` rows
// (rows[0..count) or 0..count): sum_w [k·C, d] ← Σ r_i a_iᵀ, sum_b [k·C] ← Σ r_i (if not
// null). A, P, Vw contiguous. Threads reduce into private partial sums, added in a fixed order
// (deterministic).
template <typename T>
void head_hvp_sum(const T* A, const T* P, const T* Vw, const T* Vb, const int64_t* rows,
                  int64_t count, int64_t k, int64_t C, int64_t d, T* sum_w, T* sum_b) {
  const int64_t kC = k * C;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), count / kMinRowsPerChunk));
  const int64_t stride = kC * d + kC + kRowBlock * kC;  // acc_w, acc_b, scratch u
  std::vector<T> partial(chunks * stride, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      T* acc = partial.data() + chunk * stride;
      hvp_rows_kernel(A, P, Vw, Vb, rows, chunk * count / chunks, (chunk + 1) * count / chunks,
                      k, C, d, acc + kC * d + kC, acc, acc + kC * d);
    }
  });
  std::copy(partial.begin(), partial.begin() + kC * d, sum_w);
  if (sum_b != nullptr) {
    std::copy(partial.begin() + kC * d, partial.begin() + kC * d + kC, sum_b);
  }
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const T* acc = partial.data() + chunk * stride;
    axpy(T(1), acc, sum_w, kC * d);
    if (sum_b != nullptr) {
      axpy(T(1), acc + kC * d, sum_b, kC);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> head_hvp_cpu(const at::Tensor& A, const at::Tensor& P,
                                                const at::Tensor& Vw,
                                                const std::optional<at::Tensor>& Vb,
                                                double damping) {
  check_head(A, P, Vw, Vb, "Vw", "Vb");
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Vw_c = Vw.contiguous();
  const at::Tensor Vb_c = Vb.has_value() ? Vb->contiguous() : at::Tensor();
  const int64_t n = A.size(0), k = Vw.size(0), C = P.size(1), d = A.size(1);
  at::Tensor HVw = at::empty({k, C, d}, A.options());
  at::Tensor HVb = Vb.has_value() ? at::empty({k, C}, A.options()) : at::empty({0}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_hvp_cpu", [&] {
    const scalar_t* vb = Vb.has_value() ? Vb_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* hvb = Vb.has_value() ? HVb.mutable_data_ptr<scalar_t>() : nullptr;
    head_hvp_sum(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
                 Vw_c.const_data_ptr<scalar_t>(), vb, nullptr, n, k, C, d,
                 HVw.mutable_data_ptr<scalar_t>(), hvb);
    // H V + λ V = sum / n + λ V.
    const scalar_t inv_rows = scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(n, 1));
    const scalar_t lambda = static_cast<scalar_t>(damping);
    scalar_t* hvw = HVw.mutable_data_ptr<scalar_t>();
    const scalar_t* vw = Vw_c.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < k * C * d; ++j) {
      hvw[j] = hvw[j] * inv_rows + lambda * vw[j];
    }
    for (int64_t c = 0; hvb != nullptr && c < k * C; ++c) {
      hvb[c] = hvb[c] * inv_rows + lambda * vb[c];
    }
  });
  return {HVw, HVb};
}

at::Tensor head_scores_cpu(const at::Tensor& A, const at::Tensor& P, const at::Tensor& y,
                           const at::Tensor& Sw, const std::optional<at::Tensor>& Sb) {
  check_head(A, P, Sw, Sb, "Sw", "Sb");
  check_labels(y, A);
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Sw_c = Sw.contiguous();
  const at::Tensor y_c = y.contiguous();
  const at::Tensor Sb_c = Sb.has_value() ? Sb->contiguous() : at::Tensor();
  const int64_t n = A.size(0), k = Sw.size(0), C = P.size(1), d = A.size(1);
  at::Tensor scores = at::empty({n, k}, A.options());
  std::atomic<int64_t> bad_labels{0};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_scores_cpu", [&] {
    const scalar_t* sb = Sb.has_value() ? Sb_c.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kMinRowsPerChunk, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> s(kRowBlock * k * C);
      bad_labels += scores_rows_kernel(
          A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
          y_c.const_data_ptr<int64_t>(), Sw_c.const_data_ptr<scalar_t>(), sb, begin, end, k, C,
          d, s.data(), scores.mutable_data_ptr<scalar_t>());
    });
  });
  TORCH_CHECK(bad_labels.load() == 0, "y must hold labels in [0, C=", C, "); ",
              bad_labels.load(), " do not");
  return scores;
}

std::tuple<at::Tensor, at::Tensor> head_lissa_cpu(const at::Tensor& A, const at::Tensor& P,
                                                  const at::Tensor& Gw,
                                                  const std::optional<at::Tensor>& Gb,
                                                  double damping, double scale, int64_t depth,
                                                  std::optional<int64_t> batch_size,
                                                  int64_t seed) {
  check_head(A, P, Gw, Gb, "Gw", "Gb");
  check_lissa_params(damping, scale, depth, batch_size);
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Gw_c = Gw.contiguous();
  const bool has_bias = Gb.has_value();
  const at::Tensor Gb_c = has_bias ? Gb->contiguous() : at::zeros({0}, A.options());
  const int64_t n = A.size(0), k = Gw.size(0), C = P.size(1), d = A.size(1);
  const bool full_batch = !batch_size.has_value() || *batch_size >= n;
  const int64_t count = full_batch ? n : *batch_size;
  at::Tensor hw = Gw_c.clone();
  at::Tensor hb = Gb_c.clone();
  std::vector<int64_t> rows(full_batch ? 0 : count);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_lissa_cpu", [&] {
    scalar_t* h_w = hw.mutable_data_ptr<scalar_t>();
    scalar_t* h_b = has_bias ? hb.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g_w = Gw_c.const_data_ptr<scalar_t>();
    const scalar_t* g_b = Gb_c.const_data_ptr<scalar_t>();
    std::vector<scalar_t> hv_w(k * C * d), hv_b(k * C);
    const scalar_t keep = scalar_t(1.0 - damping / scale);
    // H_B h / scale = (Σ_B r aᵀ) / (count · scale).
    const scalar_t inv_scale = scalar_t(1.0 / (scale * std::max<int64_t>(count, 1)));
    for (int64_t step = 0; step < depth; ++step) {
      for (int64_t draw = 0; draw < static_cast<int64_t>(rows.size()); ++draw) {
        rows[draw] = lissa_row(seed, step, count, draw, n);
      }
      head_hvp_sum(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(), h_w, h_b,
                   full_batch ? nullptr : rows.data(), count, k, C, d, hv_w.data(),
                   has_bias ? hv_b.data() : nullptr);
      lissa_update_range(h_w, g_w, hv_w.data(), k * C * d, keep, inv_scale);
      lissa_update_range(h_b, g_b, hv_b.data(), has_bias ? k * C : 0, keep, inv_scale);
    }
  });
  return {hw.div_(scale), hb.div_(scale)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CPU, m) {
  m.impl("head_hvp", &head_hvp_cpu);
  m.impl("head_scores", &head_scores_cpu);
  m.impl("head_lissa", &head_lissa_cpu);
}

}  // namespace fastinfluence
