// merge_lowrank_ on CUDA: the shared row-block driver (cuBLAS GEMM via ATen) with the CUDA
// merge_dense_ epilogue, all on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/merge_lowrank.h"
#include "cuda/cuda_ops.h"

namespace safegene {
namespace {

void merge_lowrank_cuda_(const at::Tensor& w, const at::Tensor& B, const at::Tensor& A,
                         double alpha) {
  const c10::cuda::CUDAGuard guard(w.device());
  merge_lowrank_impl(w, B, A, alpha, &merge_dense_cuda_, /*threads=*/1);
}

}  // namespace
}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CUDA, m) {
  m.impl("merge_lowrank_", &safegene::merge_lowrank_cuda_);
}
