// delta on CUDA: out = a - mean(b_1..b_K) in float32, one grid-stride pass over the inputs.
// The K sources travel by value in the kernel's parameters; their dtypes are uniform across
// threads, so the per-source switch does not diverge.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/cuda_ops.h"
#include "cuda/elementwise.cuh"

namespace safegene {
namespace {

enum SourceType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct Sources {
  const void* ptr[kMaxSources];
  int type[kMaxSources];
  int count;
};

__device__ __forceinline__ float load_any(const void* p, int type, int64_t i) {
  switch (type) {
    case kBF16: return to_f32(static_cast<const bf16_t*>(p)[i]);
    case kF16: return to_f32(static_cast<const f16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

template <class T>
__device__ __forceinline__ void add_pack(float* sum, const void* p, int64_t pack, bool first) {
  const Pack<T> x = static_cast<const Pack<T>*>(p)[pack];
#pragma unroll
  for (int j = 0; j < kPack; ++j) sum[j] = first ? to_f32(x.v[j]) : add_rn(sum[j], to_f32(x.v[j]));
}

template <class A, bool kVector>
__global__ void delta_kernel(const A* __restrict__ a, Sources b, float* __restrict__ out,
                             int64_t n) {
  const float k = static_cast<float>(b.count);
  int64_t tail = 0;
  if constexpr (kVector) {
    const int64_t packs = n / kPack;
    for (int64_t p = global_thread(); p < packs; p += grid_threads()) {
      float sum[kPack];
      for (int s = 0; s < b.count; ++s) {
        switch (b.type[s]) {
          case kBF16: add_pack<bf16_t>(sum, b.ptr[s], p, s == 0); break;
          case kF16: add_pack<f16_t>(sum, b.ptr[s], p, s == 0); break;
          default: add_pack<float>(sum, b.ptr[s], p, s == 0); break;
        }
      }
      const Pack<A> ap = reinterpret_cast<const Pack<A>*>(a)[p];
      Pack<float> o;
#pragma unroll
      for (int j = 0; j < kPack; ++j) o.v[j] = delta_value(to_f32(ap.v[j]), sum[j], k);
      reinterpret_cast<Pack<float>*>(out)[p] = o;
    }
    tail = packs * kPack;
  }
  for (int64_t i = tail + global_thread(); i < n; i += grid_threads()) {
    float sum = load_any(b.ptr[0], b.type[0], i);
    for (int s = 1; s < b.count; ++s) sum = add_rn(sum, load_any(b.ptr[s], b.type[s], i));
    out[i] = delta_value(to_f32(a[i]), sum, k);
  }
}

int source_type(at::ScalarType t) {
  return t == at::kBFloat16 ? kBF16 : t == at::kHalf ? kF16 : kF32;
}

}  // namespace

void delta_out_cuda(const at::Tensor& a, at::TensorList b, const at::Tensor& out) {
  check_delta(a, b, out);
  const int64_t n = a.numel();
  if (n == 0) return;
  Sources sources{};
  bool vector = aligned16(a.const_data_ptr()) && aligned16(out.data_ptr());
  sources.count = static_cast<int>(b.size());
  for (size_t s = 0; s < b.size(); ++s) {
    sources.ptr[s] = b[s].const_data_ptr();
    sources.type[s] = source_type(b[s].scalar_type());
    vector = vector && aligned16(sources.ptr[s]);
  }
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* op_out = out.data_ptr<float>();
  SG_DISPATCH_FLOAT(a.scalar_type(), A, [&] {
    const A* ap = static_cast<const A*>(a.const_data_ptr());
    if (vector) {
      delta_kernel<A, true><<<grid_blocks(n / kPack), kThreads, 0, stream>>>(ap, sources, op_out, n);
    } else {
      delta_kernel<A, false><<<grid_blocks(n), kThreads, 0, stream>>>(ap, sources, op_out, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor delta_cuda(const at::Tensor& a, at::TensorList b) {
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  delta_out_cuda(a, b, out);
  return out;
}

}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CUDA, m) {
  m.impl("delta", &safegene::delta_cuda);
  m.impl("delta_out", &safegene::delta_out_cuda);
}
