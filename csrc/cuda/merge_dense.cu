// merge_dense_ on CUDA: w = round(w + alpha * d), one fused grid-stride pass, in place.
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
template <class W, class D, bool kVector>
__global__ void merge_dense_kernel(W* __restrict__ w, const D* __restrict__ d, float alpha,
                                   int64_t n) {
  int64_t tail = 0;
  if constexpr (kVector) {
    const int64_t packs = n / kPack;
    for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
      Pack<W> wp = reinterpret_cast<const Pack<W>*>(w)[p];
      const Pack<D> dp = reinterpret_cast<const Pack<D>*>(d)[p];
#pragma unroll
      for (int j = 0; j < kPack; ++j) wp.v[j] = merged_value(wp.v[j], dp.v[j], alpha);
      reinterpret_cast<Pack<W>*>(w)[p] = wp;
    }
    tail = packs * kPack;
  }
  for (int64_t i = tail + global_thread(); i < n; i += grid_threads()) {
    w[i] = merged_value(w[i], d[i], alpha);
  }
}

}  // namespace

void merge_dense_cuda_(const at::Tensor& w, const at::Tensor& d, double alpha) {
  check_merge_dense(w, d);
  const int64_t n = w.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vector = aligned16(w.data_ptr()) && aligned16(d.const_data_ptr());
  const float alpha_f = static_cast<float>(alpha);
  SG_DISPATCH_FLOAT(w.scalar_type(), W, [&] {
    SG_DISPATCH_FLOAT(d.scalar_type(), D, [&] {
      W* wp = static_cast<W*>(w.data_ptr());
      const D* dp = static_cast<const D*>(d.const_data_ptr());
      if (vector) {
        merge_dense_kernel<W, D, true><<<grid_blocks(n / kPack), kThreads, 0, stream>>>(wp, dp, alpha_f, n);
      } else {
        merge_dense_kernel<W, D, false><<<grid_blocks(n), kThreads, 0, stream>>>(wp, dp, alpha_f, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CUDA, m) { m.impl("merge_dense_", &safegene::merge_dense_cuda_); }
