// CPU kernel of lissa_update_: v ← g + (1 − damping/scale)·v − hv/scale in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops/glue.h"
#include "ops/head_common.h"

namespace fastinfluence {
namespace {

// Entries per task: below this, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

template <typename T>
FI_CPU_CLONES void update_kernel(T* v, const T* g, const T* hv, int64_t len, T keep,
                                 T inv_scale) {
  lissa_update_range(v, g, hv, len, keep, inv_scale);
}

void lissa_update_cpu(at::Tensor& v, const at::Tensor& g, const at::Tensor& hv, double damping,
                      double scale) {
  check_lissa_update(v, g, hv);
  TORCH_CHECK(scale > 0, "scale must be > 0, got ", scale);
  at::Tensor v_c = v.contiguous();
  const at::Tensor g_c = g.contiguous(), hv_c = hv.contiguous();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "lissa_update_cpu", [&] {
    scalar_t* v_data = v_c.mutable_data_ptr<scalar_t>();
    const scalar_t* g_data = g_c.const_data_ptr<scalar_t>();
    const scalar_t* hv_data = hv_c.const_data_ptr<scalar_t>();
    const auto keep = static_cast<scalar_t>(1.0 - damping / scale);
    const auto inv_scale = static_cast<scalar_t>(1.0 / scale);
    at::parallel_for(0, v.numel(), kGrain, [&](int64_t begin, int64_t end) {
      update_kernel(v_data + begin, g_data + begin, hv_data + begin, end - begin, keep,
                    inv_scale);
    });
  });
  if (!v.is_same(v_c)) {
    v.copy_(v_c);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinfluence, CPU, m) {
  m.impl("lissa_update_", &lissa_update_cpu);
}

}  // namespace fastinfluence
