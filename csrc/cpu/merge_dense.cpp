// merge_dense_ on CPU: w = round(w + alpha * d), one fused pass, in place.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/convert.h"
#include "common/cpu_isa.h"
#include "cpu/cpu_ops.h"

namespace safegene {
namespace {

template <class W, class D>
inline __attribute__((always_inline)) void merge_dense_body(W* w, const D* d, float alpha,
                                                            int64_t n) {
  for (int64_t i = 0; i < n; ++i) w[i] = merged_value(w[i], d[i], alpha);
}
SG_CPU_MULTIVERSION(merge_dense_loop, merge_dense_body)

}  // namespace

void merge_dense_cpu_(const at::Tensor& w, const at::Tensor& d, double alpha) {
  check_merge_dense(w, d);
  const float alpha_f = static_cast<float>(alpha);  // torch also scales in float32
  SG_DISPATCH_FLOAT(w.scalar_type(), W, [&] {
    SG_DISPATCH_FLOAT(d.scalar_type(), D, [&] {
      W* wp = static_cast<W*>(w.data_ptr());
      const D* dp = static_cast<const D*>(d.const_data_ptr());
      at::parallel_for(0, w.numel(), kCpuGrain, [&](int64_t begin, int64_t end) {
        merge_dense_loop(wp + begin, dp + begin, alpha_f, end - begin);
      });
    });
  });
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CPU, m) { m.impl("merge_dense_", &safegene::merge_dense_cpu_); }
