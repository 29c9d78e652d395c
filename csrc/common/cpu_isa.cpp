#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace safegene {

CpuIsa best_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kDefault;
}

static std::atomic<int> g_isa{static_cast<int>(best_cpu_isa())};

CpuIsa cpu_isa() { return static_cast<CpuIsa>(g_isa.load(std::memory_order_relaxed)); }

void set_cpu_isa(CpuIsa isa) {
  TORCH_CHECK_VALUE(static_cast<int>(isa) <= static_cast<int>(best_cpu_isa()),
                    "set_cpu_isa: this CPU cannot run the ", cpu_isa_name(isa),
                    " kernels; the best it supports is ", cpu_isa_name(best_cpu_isa()), ".");
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

CpuIsa parse_cpu_isa(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kDefault}) {
    if (name == cpu_isa_name(isa)) return isa;
  }
  TORCH_CHECK_VALUE(false, "set_cpu_isa: unknown instruction set '", name,
                    "'; expected avx512, avx2 or default.");
}

}  // namespace safegene
