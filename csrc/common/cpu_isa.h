// Runtime choice of the CPU instruction set for the fused loops. Each loop body is written once
// (a plain loop over the helpers in convert.h) and compiled three times by SG_CPU_MULTIVERSION,
// so the compiler auto-vectorizes it for AVX-512, AVX2 and baseline x86-64; the best one the CPU
// supports runs. Tests lower the choice with set_cpu_isa() to cover every variant.
#pragma once

#include <string>

namespace safegene {

enum class CpuIsa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa best_cpu_isa();          // the best variant this CPU can run
CpuIsa cpu_isa();               // the variant in use
void set_cpu_isa(CpuIsa isa);   // throws if the CPU cannot run it
const char* cpu_isa_name(CpuIsa isa);
CpuIsa parse_cpu_isa(const std::string& name);  // "avx512" | "avx2" | "default"

}  // namespace safegene

#if defined(__x86_64__) || defined(_M_X64)
#define SG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
#define SG_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#else
#define SG_TARGET_AVX512
#define SG_TARGET_AVX2
#endif

// Defines NAME(args...) running BODY(args...) compiled for the ISA in use. BODY must be an
// always-inline function template, so each variant gets its own vectorized copy.
#define SG_CPU_MULTIVERSION(NAME, BODY)                                                  \
  template <class... Args> SG_TARGET_AVX512 void NAME##_avx512(Args... args) { BODY(args...); } \
  template <class... Args> SG_TARGET_AVX2 void NAME##_avx2(Args... args) { BODY(args...); }     \
  template <class... Args> void NAME##_default(Args... args) { BODY(args...); }                 \
  template <class... Args> void NAME(Args... args) {                                   \
    switch (::safegene::cpu_isa()) {                                                   \
      case ::safegene::CpuIsa::kAvx512: return NAME##_avx512(args...);                 \
      case ::safegene::CpuIsa::kAvx2: return NAME##_avx2(args...);                     \
      default: return NAME##_default(args...);                                         \
    }                                                                                  \
  }
