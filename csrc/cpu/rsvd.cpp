// rsvd on CPU: the shared randomized SVD with the CPU delta kernel.
#include <torch/library.h>

#include "common/rsvd.h"
#include "cpu/cpu_ops.h"

namespace safegene {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& a, at::TensorList b,
                                                        int64_t rank, int64_t oversample,
                                                        int64_t power_iters, int64_t seed,
                                                        double energy, int64_t max_rank) {
  return rsvd_impl(a, b, rank, oversample, power_iters, seed, energy, max_rank, &delta_cpu);
}

}  // namespace
}  // namespace safegene

TORCH_LIBRARY_IMPL(safegene_fast, CPU, m) { m.impl("rsvd", &safegene::rsvd_cpu); }
