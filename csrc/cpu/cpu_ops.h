// CPU entry points that other CPU ops reuse (merge_lowrank_'s epilogue, rsvd's delta).
#pragma once

#include <ATen/ATen.h>

namespace safegene {

// a: any shape; b: K tensors of a's shape. out = a - mean(b), float32, a's shape.
void delta_out_cpu(const at::Tensor& a, at::TensorList b, const at::Tensor& out);
at::Tensor delta_cpu(const at::Tensor& a, at::TensorList b);

// w: any shape, modified in place; d: w's shape. w = round(w + alpha * d).
void merge_dense_cpu_(const at::Tensor& w, const at::Tensor& d, double alpha);

// Elements one parallel_for task takes: large enough to amortize scheduling, small enough
// that both cores get work on a single 4096-wide row block.
constexpr int64_t kCpuGrain = 1 << 15;

}  // namespace safegene
