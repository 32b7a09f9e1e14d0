// Registers the CUDA kernels of the per-sample gradient ops (per_sample_grad_kernel.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/launchers.h"
#include "ops/glue.h"

namespace fastinfluence {
namespace {

at::Tensor linear_per_sample_grad_cuda(const at::Tensor& x, const at::Tensor& grad_out) {
  check_linear(x, grad_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_samples(x), g3 = as_samples(grad_out);
  const int64_t n = x3.size(0), S = x3.size(1), in = x3.size(2), out = g3.size(2);
  at::Tensor G = at::empty({n, out, in}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_per_sample_grad_cuda", [&] {
    cuda::linear_per_sample_grad(x3.const_data_ptr<scalar_t>(), g3.const_data_ptr<scalar_t>(),
                                 n, S, in, out, G.mutable_data_ptr<scalar_t>(),
                                 c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return G;
}

at::Tensor linear_per_sample_grad_dot_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                           const at::Tensor& v) {
  check_linear(x, grad_out);
  check_vector(v, grad_out.size(-1), x.size(-1), x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x3 = as_samples(x), g3 = as_samples(grad_out), v_c = v.contiguous();
  const int64_t n = x3.size(0), S = x3.size(1), in = x3.size(2), out = g3.size(2);
  at::Tensor dots = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_per_sample_grad_dot_cuda", [&] {
    cuda::linear_per_sample_grad_dot(
        x3.const_data_ptr<scalar_t>(), g3.const_data_ptr<scalar_t>(),
        v_c.const_data_ptr<scalar_t>(), n, S, in, out, dots.mutable_data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dots;
}

at::Tensor conv2d_per_sample_grad_cuda(const at::Tensor& x_unfolded,
                                       const at::Tensor& grad_out) {
  check_conv2d(x_unfolded, grad_out);
  const c10::cuda::CUDAGuard guard(x_unfolded.device());
  const at::Tensor x_c = x_unfolded.contiguous(), g_c = grad_out.contiguous();
  const int64_t n = x_c.size(0), K = x_c.size(1), L = x_c.size(2), C_out = g_c.size(1);
  at::Tensor G = at::empty({n, C_out, K}, x_c.options());
  AT_DISPATCH_FLOATING_TYPES(x_c.scalar_type(), "conv2d_per_sample_grad_cuda", [&] {
    cuda::conv2d_per_sample_grad(x_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<scalar_t>(),
                                 n, K, L, C_out, G.mutable_data_ptr<scalar_t>(),
                                 c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return G;
}

at::Tensor conv2d_per_sample_grad_dot_cuda(const at::Tensor& x_unfolded,
                                           const at::Tensor& grad_out, const at::Tensor& v) {
  check_conv2d(x_unfolded, grad_out);
  check_vector(v, grad_out.size(1), x_unfolded.size(1), x_unfolded);
  const c10::cuda::CUDAGuard guard(x_unfolded.device());
  const at::Tensor x_c = x_unfolded.contiguous(), g_c = grad_out.contiguous();
  const at::Tensor v_c = v.contiguous();
  const int64_t n = x_c.size(0), K = x_c.size(1), L = x_c.size(2), C_out = g_c.size(1);
  at::Tensor dots = at::empty({n}, x_c.options());
  AT_DISPATCH_FLOATING_TYPES(x_c.scalar_type(), "conv2d_per_sample_grad_dot_cuda", [&] {
    cuda::conv2d_per_sample_grad_dot(
        x_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<scalar_t>(),
        v_c.const_data_ptr<scalar_t>(), n, K, L, C_out, dots.mutable_data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dots;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CUDA, m) {
  m.impl("linear_per_sample_grad", &linear_per_sample_grad_cuda);
  m.impl("linear_per_sample_grad_dot", &linear_per_sample_grad_dot_cuda);
  m.impl("conv2d_per_sample_grad", &conv2d_per_sample_grad_cuda);
  m.impl("conv2d_per_sample_grad_dot", &conv2d_per_sample_grad_dot_cuda);
}

}  // namespace fastinfluence
