// delta on CPU: out = a - mean(b_1..b_K) in float32, one pass over the inputs. Each task walks
// its range in L1-sized chunks: the K sources are summed into a chunk buffer, then a is read
// and out written, so every input byte is read once and out written once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/convert.h"
#include "common/cpu_isa.h"
#include "cpu/cpu_ops.h"

namespace safegene {
namespace {

constexpr int64_t kChunk = 2048;  // fp32 sums of one chunk: 8 KiB, stays in L1

template <bool kFirst, class T>
inline __attribute__((always_inline)) void accumulate(float* sum, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sum[i] = kFirst ? to_f32(src[i]) : add_rn(sum[i], to_f32(src[i]));
}

template <bool kFirst>
inline __attribute__((always_inline)) void accumulate_any(float* sum, const void* src,
                                                          at::ScalarType dtype, int64_t offset,
                                                          int64_t n) {
  switch (dtype) {
    case at::kBFloat16: return accumulate<kFirst>(sum, static_cast<const bf16_t*>(src) + offset, n);
    case at::kHalf: return accumulate<kFirst>(sum, static_cast<const f16_t*>(src) + offset, n);
    default: return accumulate<kFirst>(sum, static_cast<const float*>(src) + offset, n);
  }
}

template <class A>
inline __attribute__((always_inline)) void delta_body(const A* a, const void* const* srcs,
                                                      const at::ScalarType* dtypes, int64_t k,
                                                      float* out, int64_t begin, int64_t end) {
  alignas(64) float sum[kChunk];
  const float kf = static_cast<float>(k);
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t n = std::min(kChunk, end - c);
    accumulate_any<true>(sum, srcs[0], dtypes[0], c, n);
    for (int64_t s = 1; s < k; ++s) accumulate_any<false>(sum, srcs[s], dtypes[s], c, n);
    for (int64_t i = 0; i < n; ++i) out[c + i] = delta_value(to_f32(a[c + i]), sum[i], kf);
  }
}
SG_CPU_MULTIVERSION(delta_loop, delta_body)

}  // namespace

void delta_out_cpu(const at::Tensor& a, at::TensorList b, const at::Tensor& out) {
  check_delta(a, b, out);
  std::vector<const void*> srcs;
  std::vector<at::ScalarType> dtypes;
  for (const auto& t : b) {
    srcs.push_back(t.const_data_ptr());
    dtypes.push_back(t.scalar_type());
  }
  const int64_t k = static_cast<int64_t>(b.size());
  float* op_out = out.data_ptr<float>();
  SG_DISPATCH_FLOAT(a.scalar_type(), A, [&] {
    const A* ap = static_cast<const A*>(a.const_data_ptr());
    at::parallel_for(0, a.numel(), kCpuGrain, [&](int64_t begin, int64_t end) {
      delta_loop(ap, srcs.data(), dtypes.data(), k, op_out, begin, end);
    });
  });
}

at::Tensor delta_cpu(const at::Tensor& a, at::TensorList b) {
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  delta_out_cpu(a, b, out);
  return out;
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CPU, m) {
  m.impl("delta", &safegene::delta_cpu);
  m.impl("delta_out", &safegene::delta_out_cpu);
}
