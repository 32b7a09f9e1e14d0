// Registers the CUDA kernels of head_hvp, head_scores and head_lissa (head_kernel.cu,
// lissa_update_kernel.cu): checks, output allocation, dtype dispatch, stream, and the GEMM
// pass of the HVP (ATen's addmm, i.e. cuBLAS). Workspaces come from torch's caching
// allocator, and head_lissa allocates its buffers once for all steps.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/cuda/launchers.h"
#include "ops/glue.h"

namespace fastinfluence {
namespace {

void check_classes(const at::Tensor& P) {
  TORCH_CHECK(P.size(1) <= cuda::kHeadMaxClassesCuda, "the CUDA head kernels support at most ",
              cuda::kHeadMaxClassesCuda, " classes, P has ", P.size(1));
}

template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// HVw [k·C, d] ← alpha·Rᵀ A + beta·Vw and, when HVb is defined, HVb [k·C] ← alpha·colsum(R)
// (+ beta·Vb when Vb is defined), with R [n, k·C] the residuals of the directions (Vw, Vb)
// on the rows of A (head_residuals). All contiguous.
void head_hvp_into(const at::Tensor& A, const at::Tensor& P, const at::Tensor& Vw,
                   const at::Tensor& Vb, int64_t k, double alpha, double beta, at::Tensor& R,
                   at::Tensor& HVw, at::Tensor& HVb) {
  const int64_t n = A.size(0), C = P.size(1), d = A.size(1);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_residuals_cuda", [&] {
    cuda::head_residuals(A.const_data_ptr<scalar_t>(), P.const_data_ptr<scalar_t>(),
                         Vw.const_data_ptr<scalar_t>(), optional_data<scalar_t>(Vb), n, k, C,
                         d, R.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The rank-n update Rᵀ A is a GEMM: cuBLAS (addmm folds in beta·Vw).
  at::addmm_out(HVw, Vw, R.t(), A, beta, alpha);
  if (HVb.defined()) {
    at::sum_out(HVb, R, at::IntArrayRef{0}).mul_(alpha);
    if (Vb.defined()) {
      HVb.add_(Vb, beta);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> head_hvp_cuda(const at::Tensor& A, const at::Tensor& P,
                                                 const at::Tensor& Vw,
                                                 const std::optional<at::Tensor>& Vb,
                                                 double damping) {
  check_head(A, P, Vw, Vb, "Vw", "Vb");
  check_classes(P);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.size(0), k = Vw.size(0), C = P.size(1), d = A.size(1);
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous();
  const at::Tensor Vw_c = Vw.contiguous().view({k * C, d});
  const at::Tensor Vb_c = Vb.has_value() ? Vb->contiguous().view({k * C}) : at::Tensor();
  at::Tensor R = at::empty({n, k * C}, A.options());
  at::Tensor HVw = at::empty({k * C, d}, A.options());
  at::Tensor HVb = Vb.has_value() ? at::empty({k * C}, A.options()) : at::Tensor();
  head_hvp_into(A_c, P_c, Vw_c, Vb_c, k, 1.0 / static_cast<double>(std::max<int64_t>(n, 1)),
                damping, R, HVw, HVb);
  return {HVw.view({k, C, d}),
          Vb.has_value() ? HVb.view({k, C}) : at::empty({0}, A.options())};
}

// Out-of-range labels are counted by the kernel into a device counter, read back after it
// (one 4-byte copy, which waits for the kernel), so that bad labels raise as on CPU.
at::Tensor head_scores_cuda(const at::Tensor& A, const at::Tensor& P, const at::Tensor& y,
                            const at::Tensor& Sw, const std::optional<at::Tensor>& Sb) {
  check_head(A, P, Sw, Sb, "Sw", "Sb");
  check_labels(y, A);
  check_classes(P);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Sw_c = Sw.contiguous();
  const at::Tensor y_c = y.contiguous();
  const at::Tensor Sb_c = Sb.has_value() ? Sb->contiguous() : at::Tensor();
  const int64_t n = A.size(0), k = Sw.size(0), C = P.size(1), d = A.size(1);
  at::Tensor scores = at::empty({n, k}, A.options());
  at::Tensor bad_labels = at::zeros({1}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_scores_cuda", [&] {
    cuda::head_scores(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
                      y_c.const_data_ptr<int64_t>(), Sw_c.const_data_ptr<scalar_t>(),
                      optional_data<scalar_t>(Sb_c), n, k, C, d,
                      scores.mutable_data_ptr<scalar_t>(), bad_labels.mutable_data_ptr<int>(),
                      c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int bad = bad_labels.item<int>();
  TORCH_CHECK(bad == 0, "y must hold labels in [0, C=", C, "); ", bad, " do not");
  return scores;
}

// Per step: the minibatch rows (drawn on the device), their features gathered into buffers
// allocated once, then the residual pass and one GEMM.
std::tuple<at::Tensor, at::Tensor> head_lissa_cuda(const at::Tensor& A, const at::Tensor& P,
                                                   const at::Tensor& Gw,
                                                   const std::optional<at::Tensor>& Gb,
                                                   double damping, double scale, int64_t depth,
                                                   std::optional<int64_t> batch_size,
                                                   int64_t seed) {
  check_head(A, P, Gw, Gb, "Gw", "Gb");
  check_classes(P);
  check_lissa_params(damping, scale, depth, batch_size);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Gw_c = Gw.contiguous();
  const bool has_bias = Gb.has_value();
  const at::Tensor Gb_c = has_bias ? Gb->contiguous() : at::zeros({0}, A.options());
  const int64_t n = A.size(0), k = Gw.size(0), C = P.size(1), d = A.size(1);
  const bool full_batch = !batch_size.has_value() || *batch_size >= n;
  const int64_t count = full_batch ? n : *batch_size;
  at::Tensor hw = Gw_c.clone(), hb = Gb_c.clone();
  // [k·C, d] and [k·C] views of the iterate, which the GEMM pass reads.
  const at::Tensor hw_rows = hw.view({k * C, d});
  const at::Tensor hb_rows = has_bias ? hb.view({k * C}) : at::Tensor();
  at::Tensor hv_w = at::empty({k * C, d}, A.options());
  at::Tensor hv_b = has_bias ? at::empty({k * C}, A.options()) : at::Tensor();
  at::Tensor R = at::empty({count, k * C}, A.options());
  at::Tensor rows = at::empty({full_batch ? 0 : count}, A.options().dtype(at::kLong));
  at::Tensor A_batch = full_batch ? A_c : at::empty({count, d}, A.options());
  at::Tensor P_batch = full_batch ? P_c : at::empty({count, C}, A.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t step = 0; step < depth; ++step) {
    if (!full_batch) {
      cuda::lissa_rows(seed, step, count, n, rows.mutable_data_ptr<int64_t>(), stream);
      at::index_select_out(A_batch, A_c, 0, rows);
      at::index_select_out(P_batch, P_c, 0, rows);
    }
    // hv = Σ_B r aᵀ (unnormalised; the update below divides by count · scale).
    head_hvp_into(A_batch, P_batch, hw_rows, hb_rows, k, 1.0, 0.0, R, hv_w, hv_b);
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_lissa_cuda", [&] {
      const auto keep = static_cast<scalar_t>(1.0 - damping / scale);
      const auto inv_scale = static_cast<scalar_t>(1.0 / (scale * std::max<int64_t>(count, 1)));
      cuda::lissa_update(hw.mutable_data_ptr<scalar_t>(), Gw_c.const_data_ptr<scalar_t>(),
                         hv_w.const_data_ptr<scalar_t>(), k * C * d, keep, inv_scale, stream);
      if (has_bias) {
        cuda::lissa_update(hb.mutable_data_ptr<scalar_t>(), Gb_c.const_data_ptr<scalar_t>(),
                           hv_b.const_data_ptr<scalar_t>(), k * C, keep, inv_scale, stream);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {hw.div_(scale), hb.div_(scale)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CUDA, m) {
  m.impl("head_hvp", &head_hvp_cuda);
  m.impl("head_scores", &head_scores_cuda);
  m.impl("head_lissa", &head_lissa_cuda);
}

}  // namespace fastinfluence
