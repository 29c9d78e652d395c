// merge_diff on CPU: out = round(w + alpha * (a - b)), one fused pass (RESTA's T + alpha (A - D)):
// reads w, a and b once and writes out once, with no float32 delta in memory. Elements whose
// a - b is not finite keep w's value and are counted.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "common/checks.h"
#include "common/convert.h"
#include "common/cpu_isa.h"
#include "cpu/cpu_ops.h"

namespace safegene {
namespace {

template <class W, class A, class B>
inline __attribute__((always_inline)) void merge_diff_body(const W* w, const A* a, const B* b,
                                                           float alpha, W* out, int64_t n,
                                                           int64_t* bad_count) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool ok;
    out[i] = merged_diff_value(w[i], a[i], b[i], alpha, ok);
    bad += !ok;
  }
  *bad_count = bad;
}
SG_CPU_MULTIVERSION(merge_diff_loop, merge_diff_body)

}  // namespace

// w: any shape. a, b: w's shape. out: w's shape and dtype (may be w). Returns the count of
// non-finite a - b as an int64 0-dim tensor.
at::Tensor merge_diff_cpu(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                          double alpha, const at::Tensor& out) {
  check_merge_diff(w, a, b, out);
  const float alpha_f = static_cast<float>(alpha);  // torch also scales in float32
  std::atomic<int64_t> bad{0};
  SG_DISPATCH_FLOAT(w.scalar_type(), W, [&] {
    SG_DISPATCH_FLOAT(a.scalar_type(), A, [&] {
      SG_DISPATCH_FLOAT(b.scalar_type(), B, [&] {
        const W* wp = static_cast<const W*>(w.const_data_ptr());
        const A* ap = static_cast<const A*>(a.const_data_ptr());
        const B* bp = static_cast<const B*>(b.const_data_ptr());
        W* op = static_cast<W*>(out.data_ptr());
        at::parallel_for(0, w.numel(), kCpuGrain, [&](int64_t begin, int64_t end) {
          int64_t task_bad = 0;
          merge_diff_loop(wp + begin, ap + begin, bp + begin, alpha_f, op + begin, end - begin,
                          &task_bad);
          if (task_bad) bad.fetch_add(task_bad, std::memory_order_relaxed);
        });
      });
    });
  });
  return at::scalar_tensor(static_cast<int64_t>(bad.load()), w.options().dtype(at::kLong));
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CPU, m) { m.impl("merge_diff", &safegene::merge_diff_cpu); }
