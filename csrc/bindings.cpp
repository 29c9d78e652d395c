// The op schemas of safegene_fast (one TORCH_LIBRARY block) and the Python module
// safegene_fast._C, which reports what was built. Kernels live in cpu/<op>.cpp and
// cuda/<op>.cu; each registers itself with TORCH_LIBRARY_IMPL.
//
// Every floating tensor may be bfloat16, float16 or float32 and must be contiguous; math is
// done in float32 and rounded once to the output dtype (round-to-nearest-even).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_isa.h"

TORCH_LIBRARY(safegene_fast, m) {
  // a: any shape. b: K tensors (1 <= K <= 16) of a's shape, dtypes may differ.
  // Returns float32 (a's shape): a - (b_1 + ... + b_K) / K.
  m.def("delta(Tensor a, Tensor[] b) -> Tensor");
  // As delta, written into out: float32, a's shape, contiguous.
  m.def("delta_out(Tensor a, Tensor[] b, Tensor(a!) out) -> ()");
  // w: any shape, updated in place. d: w's shape, any supported dtype.
  // w = round(w + alpha * d), bit-identical to (w.float() + alpha * d.float()).to(w.dtype).
  m.def("merge_dense_(Tensor(a!) w, Tensor d, float alpha) -> ()");
  // w: any shape. a, b: w's shape, any supported dtypes. out: w's dtype and shape (may be w).
  // out = round(w + alpha * (a - b)) with a - b in float32, bit-identical to merge_dense_(w,
  // delta(a, [b]), alpha) in one pass; where a - b is NaN or Inf, out = w unchanged. Returns
  // the number of such elements (int64, 0-dim, on w's device). RESTA's T + alpha (A - D).
  m.def("merge_diff(Tensor w, Tensor a, Tensor b, float alpha, Tensor(a!) out) -> Tensor");
  // w: (out, in), updated in place. B: (out, r). A: (r, in).
  // w = round(w + alpha * B @ A), over row blocks with a bounded fp32 workspace.
  m.def("merge_lowrank_(Tensor(a!) w, Tensor B, Tensor A, float alpha) -> ()");
  // a: (m, n). b: K tensors (m, n) or empty. Randomized SVD of a - mean(b) (or of a):
  // returns U (m, r), S (r), V (n, r). rank > 0 fixes r; rank == 0 picks the smallest r keeping
  // `energy` of the Frobenius energy, capped by max_rank (0: no cap). Seeded, deterministic.
  m.def(
      "rsvd(Tensor a, Tensor[] b, int rank, int oversample, int power_iters, int seed, "
      "float energy, int max_rank) -> (Tensor U, Tensor S, Tensor V)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, module) {
  module.doc() = "safegene_fast native engine: registers torch.ops.safegene_fast.*";
  module.def("build_info", [] {
    py::dict info;
    info["version"] = SAFEGENE_VERSION;
    info["torch_version"] = SAFEGENE_TORCH_VERSION;  // the torch it was compiled against
#ifdef SAFEGENE_WITH_CUDA
    info["cuda_built"] = true;
    info["cuda_archs"] = SAFEGENE_CUDA_ARCHS;
#else
    info["cuda_built"] = false;
    info["cuda_archs"] = "";
#endif
    info["cpu_isa"] = safegene::cpu_isa_name(safegene::cpu_isa());
    info["cpu_isa_best"] = safegene::cpu_isa_name(safegene::best_cpu_isa());
    return info;
  });
  module.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          safegene::set_cpu_isa(safegene::parse_cpu_isa(name));
        } catch (const c10::Error& e) {  // plain pybind11 would add a C++ backtrace
          throw py::value_error(e.what_without_backtrace());
        }
      },
      "Run the CPU kernels' variant for this instruction set (avx512, avx2 or default).");
}
