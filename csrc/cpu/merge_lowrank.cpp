// merge_lowrank_ on CPU: the shared row-block driver with the CPU merge_dense_ epilogue.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/merge_lowrank.h"
#include "cpu/cpu_ops.h"

namespace safegene {
namespace {

void merge_lowrank_cpu_(const at::Tensor& w, const at::Tensor& B, const at::Tensor& A,
                        double alpha) {
  merge_lowrank_impl(w, B, A, alpha, &merge_dense_cpu_, at::get_num_threads());
}

}  // namespace
}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CPU, m) {
  m.impl("merge_lowrank_", &safegene::merge_lowrank_cpu_);
}
