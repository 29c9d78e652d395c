// CUDA entry points that other CUDA ops reuse (merge_lowrank_'s epilogue, rsvd's delta).
#pragma once

#include <ATen/ATen.h>

namespace safegene {

void delta_out_cuda(const at::Tensor& a, at::TensorList b, const at::Tensor& out);
at::Tensor delta_cuda(const at::Tensor& a, at::TensorList b);
void merge_dense_cuda_(const at::Tensor& w, const at::Tensor& d, double alpha);

}  // namespace safegene
