// CPU kernels of the per-sample gradient ops of Linear and Conv2d (unfold form), and of their
// dot products with a direction v, which never hold more than one sample's gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/glue.h"
#include "ops/per_sample_grad_common.h"

namespace fastinfluence {
namespace {

template <typename T>
FI_CPU_CLONES void linear_grad_kernel(const T* x, const T* g, int64_t begin, int64_t end,
                                      int64_t S, int64_t in, int64_t out, T* G) {
  for (int64_t i = begin; i < end; ++i) {
    linear_grad_sample(x + i * S * in, g + i * S * out, S, in, out, G + i * out * in);
  }
}

template <typename T>
FI_CPU_CLONES void linear_grad_dot_kernel(const T* x, const T* g, const T* v, int64_t begin,
                                          int64_t end, int64_t S, int64_t in, int64_t out,
                                          T* dots) {
  for (int64_t i = begin; i < end; ++i) {
    dots[i] = linear_grad_dot_sample(x + i * S * in, g + i * S * out, v, S, in, out);
  }
}

template <typename T>
FI_CPU_CLONES void conv2d_grad_kernel(const T* x, const T* g, int64_t begin, int64_t end,
                                      int64_t K, int64_t L, int64_t C_out, T* G) {
  for (int64_t i = begin; i < end; ++i) {
    conv2d_grad_sample(x + i * K * L, g + i * C_out * L, K, L, C_out, G + i * C_out * K);
  }
}

template <typename T>
FI_CPU_CLONES void conv2d_grad_dot_kernel(const T* x, const T* g, const T* v, int64_t begin,
                                          int64_t end, int64_t K, int64_t L, int64_t C_out,
                                          T* dots) {
  for (int64_t i = begin; i < end; ++i) {
    dots[i] = conv2d_grad_dot_sample(x + i * K * L, g + i * C_out * L, v, K, L, C_out);
  }
}

at::Tensor linear_per_sample_grad_cpu(const at::Tensor& x, const at::Tensor& grad_out) {
  check_linear(x, grad_out);
  const at::Tensor x3 = as_samples(x), g3 = as_samples(grad_out);
  const int64_t n = x3.size(0), S = x3.size(1), in = x3.size(2), out = g3.size(2);
  at::Tensor G = at::empty({n, out, in}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_per_sample_grad_cpu", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      linear_grad_kernel(x3.const_data_ptr<scalar_t>(), g3.const_data_ptr<scalar_t>(), begin,
                         end, S, in, out, G.mutable_data_ptr<scalar_t>());
    });
  });
  return G;
}

at::Tensor linear_per_sample_grad_dot_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                          const at::Tensor& v) {
  check_linear(x, grad_out);
  check_vector(v, grad_out.size(-1), x.size(-1), x);
  const at::Tensor x3 = as_samples(x), g3 = as_samples(grad_out), v_c = v.contiguous();
  const int64_t n = x3.size(0), S = x3.size(1), in = x3.size(2), out = g3.size(2);
  at::Tensor dots = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_per_sample_grad_dot_cpu", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      linear_grad_dot_kernel(x3.const_data_ptr<scalar_t>(), g3.const_data_ptr<scalar_t>(),
                             v_c.const_data_ptr<scalar_t>(), begin, end, S, in, out,
                             dots.mutable_data_ptr<scalar_t>());
    });
  });
  return dots;
}

at::Tensor conv2d_per_sample_grad_cpu(const at::Tensor& x_unfolded, const at::Tensor& grad_out) {
  check_conv2d(x_unfolded, grad_out);
  const at::Tensor x_c = x_unfolded.contiguous(), g_c = grad_out.contiguous();
  const int64_t n = x_c.size(0), K = x_c.size(1), L = x_c.size(2), C_out = g_c.size(1);
  at::Tensor G = at::empty({n, C_out, K}, x_c.options());
  AT_DISPATCH_FLOATING_TYPES(x_c.scalar_type(), "conv2d_per_sample_grad_cpu", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      conv2d_grad_kernel(x_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<scalar_t>(), begin,
                         end, K, L, C_out, G.mutable_data_ptr<scalar_t>());
    });
  });
  return G;
}

at::Tensor conv2d_per_sample_grad_dot_cpu(const at::Tensor& x_unfolded,
                                          const at::Tensor& grad_out, const at::Tensor& v) {
  check_conv2d(x_unfolded, grad_out);
  check_vector(v, grad_out.size(1), x_unfolded.size(1), x_unfolded);
  const at::Tensor x_c = x_unfolded.contiguous(), g_c = grad_out.contiguous();
  const at::Tensor v_c = v.contiguous();
  const int64_t n = x_c.size(0), K = x_c.size(1), L = x_c.size(2), C_out = g_c.size(1);
  at::Tensor dots = at::empty({n}, x_c.options());
  AT_DISPATCH_FLOATING_TYPES(x_c.scalar_type(), "conv2d_per_sample_grad_dot_cpu", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      conv2d_grad_dot_kernel(x_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<scalar_t>(),
                             v_c.const_data_ptr<scalar_t>(), begin, end, K, L, C_out,
                             dots.mutable_data_ptr<scalar_t>());
    });
  });
  return dots;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CPU, m) {
  m.impl("linear_per_sample_grad", &linear_per_sample_grad_cpu);
  m.impl("linear_per_sample_grad_dot", &linear_per_sample_grad_dot_cpu);
  m.impl("conv2d_per_sample_grad", &conv2d_per_sample_grad_cpu);
  m.impl("conv2d_per_sample_grad_dot", &conv2d_per_sample_grad_dot_cpu);
}

}  // namespace fastinfluence
