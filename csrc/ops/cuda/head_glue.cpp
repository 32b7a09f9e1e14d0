// Registers the CUDA kernels of head_hvp, head_scores and head_lissa (head_kernel.cu,
// lissa_update_kernel.cu): checks, output allocation, dtype dispatch, stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

std::tuple<at::Tensor, at::Tensor> head_hvp_cuda(const at::Tensor& A, const at::Tensor& P,
                                                 const at::Tensor& Vw,
                                                 const std::optional<at::Tensor>& Vb,
                                                 double damping) {
  check_head(A, P, Vw, Vb, "Vw", "Vb");
  check_classes(P);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Vw_c = Vw.contiguous();
  const at::Tensor Vb_c = Vb.has_value() ? Vb->contiguous() : at::Tensor();
  const int64_t n = A.size(0), C = P.size(1), d = A.size(1);
  at::Tensor HVw = at::empty({C, d}, A.options());
  at::Tensor HVb = at::empty({Vb.has_value() ? C : 0}, A.options());
  at::Tensor workspace = at::empty({cuda::head_hvp_workspace_size(C, d)}, A.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_hvp_cuda", [&] {
    const auto inv_rows = scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(n, 1));
    scalar_t* hvb = Vb.has_value() ? HVb.mutable_data_ptr<scalar_t>() : nullptr;
    cuda::head_hvp_sum(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
                       Vw_c.const_data_ptr<scalar_t>(), optional_data<scalar_t>(Vb_c), nullptr,
                       n, C, d, HVw.mutable_data_ptr<scalar_t>(), hvb,
                       workspace.mutable_data_ptr<scalar_t>(), stream);
    cuda::combine(HVw.const_data_ptr<scalar_t>(), Vw_c.const_data_ptr<scalar_t>(), inv_rows,
                  static_cast<scalar_t>(damping), C * d, HVw.mutable_data_ptr<scalar_t>(),
                  stream);
    if (hvb != nullptr) {
      cuda::combine(HVb.const_data_ptr<scalar_t>(), Vb_c.const_data_ptr<scalar_t>(), inv_rows,
                    static_cast<scalar_t>(damping), C, hvb, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {HVw, HVb};
}

at::Tensor head_scores_cuda(const at::Tensor& A, const at::Tensor& P, const at::Tensor& y,
                            const at::Tensor& Sw, const std::optional<at::Tensor>& Sb) {
  check_head(A, P, Sw, Sb, "Sw", "Sb");
  check_labels(y, A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor A_c = A.contiguous(), P_c = P.contiguous(), Sw_c = Sw.contiguous();
  const at::Tensor y_c = y.contiguous();
  const at::Tensor Sb_c = Sb.has_value() ? Sb->contiguous() : at::Tensor();
  const int64_t n = A.size(0), C = P.size(1), d = A.size(1);
  at::Tensor scores = at::empty({n}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_scores_cuda", [&] {
    cuda::head_scores(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
                      y_c.const_data_ptr<int64_t>(), Sw_c.const_data_ptr<scalar_t>(),
                      optional_data<scalar_t>(Sb_c), n, C, d,
                      scores.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scores;
}

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
  const int64_t n = A.size(0), C = P.size(1), d = A.size(1);
  const bool full_batch = !batch_size.has_value() || *batch_size >= n;
  const int64_t count = full_batch ? n : *batch_size;
  at::Tensor hw = Gw_c.clone(), hb = Gb_c.clone();
  at::Tensor hv_w = at::empty({C, d}, A.options()), hv_b = at::empty({C}, A.options());
  at::Tensor workspace = at::empty({cuda::head_hvp_workspace_size(C, d)}, A.options());
  at::Tensor rows = at::empty({full_batch ? 0 : count}, A.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "head_lissa_cuda", [&] {
    const auto keep = static_cast<scalar_t>(1.0 - damping / scale);
    // H_B h / scale = (Σ_B r aᵀ) / (count · scale).
    const auto inv_scale = static_cast<scalar_t>(1.0 / (scale * std::max<int64_t>(count, 1)));
    scalar_t* h_b = has_bias ? hb.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t step = 0; step < depth; ++step) {
      if (!full_batch) {
        cuda::lissa_rows(seed, step, count, n, rows.mutable_data_ptr<int64_t>(), stream);
      }
      cuda::head_hvp_sum(A_c.const_data_ptr<scalar_t>(), P_c.const_data_ptr<scalar_t>(),
                         hw.const_data_ptr<scalar_t>(), has_bias ? h_b : nullptr,
                         full_batch ? nullptr : rows.const_data_ptr<int64_t>(), count, C, d,
                         hv_w.mutable_data_ptr<scalar_t>(),
                         has_bias ? hv_b.mutable_data_ptr<scalar_t>() : nullptr,
                         workspace.mutable_data_ptr<scalar_t>(), stream);
      cuda::lissa_update(hw.mutable_data_ptr<scalar_t>(), Gw_c.const_data_ptr<scalar_t>(),
                         hv_w.const_data_ptr<scalar_t>(), C * d, keep, inv_scale, stream);
      if (has_bias) {
        cuda::lissa_update(h_b, Gb_c.const_data_ptr<scalar_t>(),
                           hv_b.const_data_ptr<scalar_t>(), C, keep, inv_scale, stream);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {hw.div_(scale), hb.div_(scale)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CUDA, m) {
  m.impl("head_hvp", &head_hvp_cuda);
  m.impl("head_scores", &head_scores_cuda);
  m.impl("head_lissa", &head_lissa_cuda);
}

}  // namespace fastinfluence
