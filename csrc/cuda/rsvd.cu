// rsvd on CUDA: the shared randomized SVD (cuBLAS/cuSOLVER via ATen) with the CUDA delta kernel.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/rsvd.h"
#include "cuda/cuda_ops.h"

namespace safegene {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& a, at::TensorList b,
                                                         int64_t rank, int64_t oversample,
                                                         int64_t power_iters, int64_t seed,
                                                         double energy, int64_t max_rank) {
  const c10::cuda::CUDAGuard guard(a.device());
  return rsvd_impl(a, b, rank, oversample, power_iters, seed, energy, max_rank, &delta_cuda);
}

}  // namespace
}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CUDA, m) { m.impl("rsvd", &safegene::rsvd_cuda); }
