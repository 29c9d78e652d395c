// Entry-point checks shared by every op and backend. Each failure is one sentence that names
// the op, the argument and the problem, raised as a Python TypeError/ValueError.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace safegene {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name, " has dtype ",
                   t.scalar_type(), ", but only bfloat16, float16 and float32 are supported.");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " is not contiguous (sizes ", t.sizes(),
                    ", strides ", t.strides(), "); pass ", name, ".contiguous() instead.");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const std::string& name, const std::string& ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; move both to the same device.");
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const std::string& name, const std::string& ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
                    ref_name, " has shape ", ref.sizes(), "; they must match.");
}

inline void check_matrix(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D matrix, but has shape ",
                    t.sizes(), ".");
}

// A floating input of an elementwise op: supported dtype, contiguous, on ref's device, ref's shape.
inline void check_operand(const at::Tensor& t, const at::Tensor& ref, const char* op,
                          const std::string& name, const std::string& ref_name) {
  check_float(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_same_shape(t, ref, op, name, ref_name);
  check_contiguous(t, op, name);
}

// Checks delta's sources (the degraded models): 1..kMaxSources, each an operand like `a`.
constexpr int64_t kMaxSources = 16;

inline void check_sources(const at::Tensor& a, at::TensorList b, const char* op) {
  check_float(a, op, "a");
  check_contiguous(a, op, "a");
  TORCH_CHECK_VALUE(!b.empty() && static_cast<int64_t>(b.size()) <= kMaxSources, op,
                    ": b must hold between 1 and ", kMaxSources, " tensors, but holds ", b.size(),
                    ".");
  for (size_t k = 0; k < b.size(); ++k) {
    check_operand(b[k], a, op, "b[" + std::to_string(k) + "]", "a");
  }
}

// The checks of delta/delta_out: the sources, and out as a float32 tensor of a's shape.
inline void check_delta(const at::Tensor& a, at::TensorList b, const at::Tensor& out) {
  const char* op = "delta";
  check_sources(a, b, op);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, op, ": out has dtype ", out.scalar_type(),
                   ", but must be float32.");
  check_same_device(out, a, op, "out", "a");
  check_same_shape(out, a, op, "out", "a");
  check_contiguous(out, op, "out");
}

// The checks of merge_dense_: w and d contiguous, supported dtypes, same shape and device.
inline void check_merge_dense(const at::Tensor& w, const at::Tensor& d) {
  const char* op = "merge_dense_";
  check_float(w, op, "w");
  check_contiguous(w, op, "w");
  check_operand(d, w, op, "d", "w");
}

// The checks of merge_diff: w, a, b and out contiguous, supported dtypes, same shape and
// device; out has w's dtype.
inline void check_merge_diff(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& out) {
  const char* op = "merge_diff";
  check_float(w, op, "w");
  check_contiguous(w, op, "w");
  check_operand(a, w, op, "a", "w");
  check_operand(b, w, op, "b", "w");
  check_operand(out, w, op, "out", "w");
  TORCH_CHECK_TYPE(out.scalar_type() == w.scalar_type(), op, ": out has dtype ",
                   out.scalar_type(), " but w has dtype ", w.scalar_type(), "; they must match.");
}

// Dispatches on a supported float dtype, binding T to safegene's storage type for it.
#define SG_DISPATCH_FLOAT(dtype, T, ...)                                  \
  [&] {                                                                   \
    switch (dtype) {                                                      \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using T = ::safegene::bf16_t; return __VA_ARGS__(); } \
      case at::kHalf: { using T = ::safegene::f16_t; return __VA_ARGS__(); }      \
      default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);      \
    }                                                                     \
  }()

}  // namespace safegene
