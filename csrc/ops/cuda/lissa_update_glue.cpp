// Registers the CUDA kernel of lissa_update_ (lissa_update_kernel.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/launchers.h"
#include "ops/glue.h"

namespace fastinfluence {
namespace {

void lissa_update_cuda(at::Tensor& v, const at::Tensor& g, const at::Tensor& hv, double damping,
                       double scale) {
  check_lissa_update(v, g, hv);
  TORCH_CHECK(scale > 0, "scale must be > 0, got ", scale);
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor v_c = v.contiguous();
  const at::Tensor g_c = g.contiguous(), hv_c = hv.contiguous();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "lissa_update_cuda", [&] {
    cuda::lissa_update(v_c.mutable_data_ptr<scalar_t>(), g_c.const_data_ptr<scalar_t>(),
                       hv_c.const_data_ptr<scalar_t>(), v.numel(),
                       static_cast<scalar_t>(1.0 - damping / scale),
                       static_cast<scalar_t>(1.0 / scale), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!v.is_same(v_c)) {
    v.copy_(v_c);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CUDA, m) {
  m.impl("lissa_update_", &lissa_update_cuda);
}

}  // namespace fastinfluence
