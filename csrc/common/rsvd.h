// rsvd for any device: randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4) of a matrix or
// of the implicit difference a - mean(b). The difference is formed once in fp32 by the
// backend's delta kernel (the only full-size fp32 matrix); everything else is m x l or l x n.
// GEMM, QR and the small SVD come from ATen, so the same code runs on CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <tuple>

#include "common/checks.h"

namespace safegene {

// ||d||_F^2 in double from per-row fp32 norms: one fp32 reduction over a whole 28672x8192
// matrix came out 7% low (accumulated rounding), an fp32 row of a few thousand terms does not.
inline double squared_frobenius(const at::Tensor& d) {
  return at::linalg_vector_norm(d, 2, at::IntArrayRef{1}).to(at::kDouble).square().sum().item<double>();
}

inline at::Tensor orthonormal_basis(const at::Tensor& y) {
  return std::get<0>(at::linalg_qr(y, "reduced"));
}

// a: (m, n); b: K tensors (m, n) or none. Returns U (m, r), S (r), V (n, r) with
// a - mean(b) ~= U diag(S) V^T. rank > 0 fixes r; rank == 0 picks the smallest r whose
// singular values keep `energy` of the squared Frobenius norm, capped by max_rank (0: no cap).
// delta(a, b) is the backend's delta kernel.
template <class Delta>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& a, at::TensorList b,
                                                         int64_t rank, int64_t oversample,
                                                         int64_t power_iters, int64_t seed,
                                                         double energy, int64_t max_rank,
                                                         Delta delta) {
  const char* op = "rsvd";
  check_float(a, op, "a");
  check_matrix(a, op, "a");
  check_contiguous(a, op, "a");
  if (!b.empty()) check_sources(a, b, op);
  TORCH_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample, ".");
  TORCH_CHECK_VALUE(power_iters >= 0, op, ": power_iters must be >= 0, got ", power_iters, ".");
  TORCH_CHECK_VALUE(max_rank >= 0, op, ": max_rank must be >= 0, got ", max_rank, ".");
  const bool by_energy = rank == 0;
  if (by_energy) {
    TORCH_CHECK_VALUE(energy > 0.0 && energy <= 1.0, op,
                      ": energy must be in (0, 1] when rank is 0, got ", energy, ".");
  } else {
    TORCH_CHECK_VALUE(rank > 0, op, ": rank must be positive (or 0 to choose it by energy), got ",
                      rank, ".");
    TORCH_CHECK_VALUE(energy == 0.0, op, ": give either a rank or an energy fraction, not both.");
  }
  const int64_t m = a.size(0), n = a.size(1), full = std::min(m, n);
  int64_t cap = by_energy ? full : std::min(rank, full);
  if (max_rank > 0) cap = std::min(cap, max_rank);

  const at::Tensor d = !b.empty() ? delta(a, b) : a.to(at::kFloat);  // the one fp32 matrix
  const auto f32 = d.options();
  if (cap == 0) {
    return {at::zeros({m, 0}, f32), at::zeros({0}, f32), at::zeros({n, 0}, f32)};
  }

  // Gaussian test matrix drawn on the CPU from `seed`: same factors for a seed on any device.
  const int64_t sketch = std::min(cap + oversample, full);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const at::Tensor omega = at::randn({n, sketch}, gen, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor y = d.mm(omega.to(d.device()));
  TORCH_CHECK_VALUE(at::isfinite(y).all().item<bool>(), op,
                    ": the matrix contains NaN or Inf, so it has no SVD.");
  at::Tensor q = orthonormal_basis(y);
  for (int64_t i = 0; i < power_iters; ++i) {  // re-orthonormalize after every product
    q = orthonormal_basis(d.mm(orthonormal_basis(d.t().mm(q))));
  }
  auto [u_small, s, vh] = at::linalg_svd(q.t().mm(d), /*full_matrices=*/false);

  int64_t r = cap;
  if (by_energy) {
    // Energy is measured against the exact total, not the sketch's, so a rank that the
    // sketch cannot reach is capped instead of overstated.
    const double total = squared_frobenius(d);
    const at::Tensor kept = s.narrow(0, 0, cap).to(at::kDouble).square().cumsum(0).cpu();
    const double* cum = kept.const_data_ptr<double>();
    const double target = energy * total;
    r = 1;
    while (r < cap && cum[r - 1] < target) ++r;
  }
  at::Tensor u = q.mm(u_small.narrow(1, 0, r));
  return {u, s.narrow(0, 0, r).contiguous(), vh.narrow(0, 0, r).t().contiguous()};
}

}  // namespace safegene
