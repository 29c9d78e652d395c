// merge_diff on CUDA: out = round(w + alpha * (a - b)), one fused grid-stride pass (RESTA's
// T + alpha (A - D)). Elements whose a - b is not finite keep w's value; each block adds its
// count of them to one int64 with a single atomic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/cuda_ops.h"
#include "cuda/elementwise.cuh"

namespace safegene {
namespace {

// kVector: every pointer is 16-byte aligned, so whole packs go through vector loads.
template <class W, class A, class B, bool kVector>
__global__ void merge_diff_kernel(const W* w, const A* __restrict__ a,
                                  const B* __restrict__ b, float alpha, W* out, int64_t n,
                                  unsigned long long* bad_count) {
  unsigned long long bad_total = 0;
  bool ok;
  int64_t tail = 0;
  if constexpr (kVector) {
    const int64_t packs = n / kPack;
    for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
      Pack<W> wp = reinterpret_cast<const Pack<W>*>(w)[p];
      const Pack<A> ap = reinterpret_cast<const Pack<A>*>(a)[p];
      const Pack<B> bp = reinterpret_cast<const Pack<B>*>(b)[p];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        wp.v[j] = merged_diff_value(wp.v[j], ap.v[j], bp.v[j], alpha, ok);
        bad_total += !ok;
      }
      reinterpret_cast<Pack<W>*>(out)[p] = wp;
    }
    tail = packs * kPack;
  }
  for (int64_t i = tail + global_thread(); i < n; i += grid_threads()) {
    out[i] = merged_diff_value(w[i], a[i], b[i], alpha, ok);
    bad_total += !ok;
  }
  // Warp sum, then one atomic per warp that saw any.
  for (int offset = 16; offset > 0; offset /= 2) {
    bad_total += __shfl_down_sync(0xFFFFFFFFu, bad_total, offset);
  }
  if ((threadIdx.x & 31) == 0 && bad_total) atomicAdd(bad_count, bad_total);
}

}  // namespace

// w: any shape. a, b: w's shape. out: w's shape and dtype (may be w). Returns the count of
// non-finite a - b as an int64 0-dim tensor on w's device.
at::Tensor merge_diff_cuda(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                           double alpha, const at::Tensor& out) {
  check_merge_diff(w, a, b, out);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor bad = at::zeros({}, w.options().dtype(at::kLong));
  const int64_t n = w.numel();
  if (n == 0) return bad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vector = aligned16(w.const_data_ptr()) && aligned16(a.const_data_ptr()) &&
                      aligned16(b.const_data_ptr()) && aligned16(out.data_ptr());
  const float alpha_f = static_cast<float>(alpha);
  auto* bad_ptr = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>());
  SG_DISPATCH_FLOAT(w.scalar_type(), W, [&] {
    SG_DISPATCH_FLOAT(a.scalar_type(), A, [&] {
      SG_DISPATCH_FLOAT(b.scalar_type(), B, [&] {
        const W* wp = static_cast<const W*>(w.const_data_ptr());
        const A* ap = static_cast<const A*>(a.const_data_ptr());
        const B* bp = static_cast<const B*>(b.const_data_ptr());
        W* op = static_cast<W*>(out.data_ptr());
        if (vector) {
          merge_diff_kernel<W, A, B, true>
              <<<grid_blocks(n / kPack), kThreads, 0, stream>>>(wp, ap, bp, alpha_f, op, n, bad_ptr);
        } else {
          merge_diff_kernel<W, A, B, false>
              <<<grid_blocks(n), kThreads, 0, stream>>>(wp, ap, bp, alpha_f, op, n, bad_ptr);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return bad;
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CUDA, m) { m.impl("merge_diff", &safegene::merge_diff_cuda); }
