// Argument checks and tensor helpers shared by the CPU and CUDA glue; check messages name the
// argument and the shape it must have.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fastinfluence {

// A [n, d], P [n, C], and k directions shaped like the head's (weight, bias): W [k, C, d],
// b [k, C] (optional). Floating point, one dtype, one device.
inline void check_head(const at::Tensor& A, const at::Tensor& P, const at::Tensor& W,
                       const std::optional<at::Tensor>& b, const char* w_name,
                       const char* b_name) {
  TORCH_CHECK(A.dim() == 2, "A must be [n, d] features, got shape ", A.sizes());
  TORCH_CHECK(P.dim() == 2 && P.size(0) == A.size(0), "P must be [n=", A.size(0),
              ", C] probabilities, got shape ", P.sizes());
  const int64_t C = P.size(1), d = A.size(1);
  TORCH_CHECK(W.dim() == 3 && W.size(1) == C && W.size(2) == d, w_name, " must be [k, C=", C,
              ", d=", d, "] (k directions), got shape ", W.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), "A must be floating point, got ",
              A.scalar_type());
  TORCH_CHECK(P.scalar_type() == A.scalar_type() && W.scalar_type() == A.scalar_type(),
              "A, P and ", w_name, " must share one dtype, got ", A.scalar_type(), ", ",
              P.scalar_type(), " and ", W.scalar_type());
  TORCH_CHECK(P.device() == A.device() && W.device() == A.device(), "A, P and ", w_name,
              " must be on one device");
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 2 && b->size(0) == W.size(0) && b->size(1) == C, b_name,
                " must be [k=", W.size(0), ", C=", C, "], got shape ", b->sizes());
    TORCH_CHECK(b->scalar_type() == A.scalar_type() && b->device() == A.device(), b_name,
                " must have A's dtype and device");
  }
}

// y int64 [n].
inline void check_labels(const at::Tensor& y, const at::Tensor& A) {
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == A.size(0),
              "y must be int64 [n=", A.size(0), "] labels, got ", y.scalar_type(), " shape ",
              y.sizes());
  TORCH_CHECK(y.device() == A.device(), "y must be on A's device");
}

// v, g, hv: one shape, dtype and device, floating point.
inline void check_lissa_update(const at::Tensor& v, const at::Tensor& g, const at::Tensor& hv) {
  TORCH_CHECK(g.sizes() == v.sizes() && hv.sizes() == v.sizes(), "g and hv must have v's shape ",
              v.sizes(), ", got ", g.sizes(), " and ", hv.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "v must be floating point, got ",
              v.scalar_type());
  TORCH_CHECK(g.scalar_type() == v.scalar_type() && hv.scalar_type() == v.scalar_type(),
              "g and hv must have v's dtype ", v.scalar_type());
  TORCH_CHECK(g.device() == v.device() && hv.device() == v.device(),
              "g and hv must be on v's device");
}

inline void check_lissa_params(double damping, double scale, int64_t depth,
                               const std::optional<int64_t>& batch_size) {
  TORCH_CHECK(damping >= 0, "damping must be >= 0, got ", damping);
  TORCH_CHECK(scale > 0, "scale must be > 0, got ", scale);
  TORCH_CHECK(depth >= 0, "depth must be >= 0, got ", depth);
  TORCH_CHECK(!batch_size.has_value() || *batch_size > 0, "batch_size must be > 0, got ",
              batch_size.value_or(0));
}

// x [n, *, in], grad_out [n, *, out] with equal leading dims; floating point, one dtype.
inline void check_linear(const at::Tensor& x, const at::Tensor& grad_out) {
  TORCH_CHECK(x.dim() >= 2, "x must be [n, *, in], got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == x.dim() &&
                  grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "grad_out must be [n, *, out] with x's leading dims ",
              x.sizes().slice(0, x.dim() - 1), ", got shape ", grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && grad_out.scalar_type() == x.scalar_type(),
              "x and grad_out must share one floating dtype, got ", x.scalar_type(), " and ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out must be on x's device");
}

// x_unfolded [n, K, L], grad_out [n, C_out, L]; floating point, one dtype.
inline void check_conv2d(const at::Tensor& x, const at::Tensor& grad_out) {
  TORCH_CHECK(x.dim() == 3, "x_unfolded must be [n, K, L], got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == x.size(0) &&
                  grad_out.size(2) == x.size(2),
              "grad_out must be [n=", x.size(0), ", C_out, L=", x.size(2), "], got shape ",
              grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && grad_out.scalar_type() == x.scalar_type(),
              "x_unfolded and grad_out must share one floating dtype, got ", x.scalar_type(),
              " and ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out must be on x_unfolded's device");
}

// v [rows, cols] with like's dtype and device.
inline void check_vector(const at::Tensor& v, int64_t rows, int64_t cols, const at::Tensor& like) {
  TORCH_CHECK(v.dim() == 2 && v.size(0) == rows && v.size(1) == cols, "v must be [", rows, ", ",
              cols, "], got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == like.scalar_type() && v.device() == like.device(),
              "v must have dtype ", like.scalar_type(), " and the inputs' device");
}

// t [n, *, k] as a contiguous [n, S, k], S the product of the sequence dims.
inline at::Tensor as_samples(const at::Tensor& t) {
  int64_t S = 1;
  for (int64_t dim = 1; dim + 1 < t.dim(); ++dim) {
    S *= t.size(dim);
  }
  return t.reshape({t.size(0), S, t.size(-1)}).contiguous();
}

}  // namespace fastinfluence
