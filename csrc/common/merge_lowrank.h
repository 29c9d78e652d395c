// merge_lowrank_ for any device: w = round(w + alpha * B @ A) over row blocks. Each block's
// product comes from an ATen GEMM into a bounded fp32 workspace, then the backend's fused
// merge_dense_ loop adds it into w and rounds once. w is never copied whole to fp32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/checks.h"

namespace safegene {

// fp32 workspace per block: a few MiB keeps the product warm in cache for the epilogue.
constexpr int64_t kLowrankWorkspaceBytes = int64_t(4) << 20;

// w: (out, in) modified in place; B: (out, r); A: (r, in).
// merge_dense(w_rows, d_rows, alpha) is the backend's merge_dense_ kernel.
// threads > 1 (CPU): the row blocks are spread over that many threads in ONE parallel region,
// each thread with its own workspace, running single-threaded GEMMs and epilogues. A parallel
// region per block would wait at every barrier for a thread that lost its core (to the
// checkpoint read-ahead thread, say): measured 48x slower on 2 busy cores. threads == 1 (CUDA):
// blocks are queued in order on the stream.
template <class MergeDense>
void merge_lowrank_impl(const at::Tensor& w, const at::Tensor& B, const at::Tensor& A,
                        double alpha, MergeDense merge_dense, int64_t threads) {
  const char* op = "merge_lowrank_";
  check_float(w, op, "w");
  check_contiguous(w, op, "w");
  check_matrix(w, op, "w");
  check_float(B, op, "B");
  check_float(A, op, "A");
  check_matrix(B, op, "B");
  check_matrix(A, op, "A");
  check_same_device(B, w, op, "B", "w");
  check_same_device(A, w, op, "A", "w");
  TORCH_CHECK_VALUE(B.size(0) == w.size(0) && A.size(1) == w.size(1) && B.size(1) == A.size(0),
                    op, ": shapes do not fit w + alpha * B @ A: w is ", w.sizes(), ", B is ",
                    B.sizes(), " and A is ", A.sizes(), ", but B must be (out, r) and A (r, in).");
  const int64_t rows = w.size(0), cols = w.size(1);
  if (w.numel() == 0) return;
  // The factors are small (r columns / r rows): one fp32 copy each for the GEMM.
  const at::Tensor b32 = B.to(at::kFloat).contiguous();
  const at::Tensor a32 = A.to(at::kFloat).contiguous();
  // At most a workspace of rows per block, and at least one block per thread.
  const int64_t per_thread = (rows + threads - 1) / threads;
  const int64_t block = std::clamp<int64_t>(kLowrankWorkspaceBytes / (cols * 4), 1, per_thread);
  const int64_t blocks = (rows + block - 1) / block;
  auto run = [&](int64_t first, int64_t last) {  // blocks [first, last)
    at::Tensor workspace = at::empty({block, cols}, w.options().dtype(at::kFloat));
    for (int64_t b = first; b < last; ++b) {
      const int64_t r0 = b * block, n = std::min(block, rows - r0);
      at::Tensor product = workspace.narrow(0, 0, n);
      at::mm_out(product, b32.narrow(0, r0, n), a32);
      merge_dense(w.narrow(0, r0, n), product, alpha);
    }
  };
  if (threads > 1) {
    at::parallel_for(0, blocks, 1, run);
  } else {
    run(0, blocks);
  }
}

}  // namespace safegene
