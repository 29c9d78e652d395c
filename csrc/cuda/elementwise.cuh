// Launch plumbing shared by the CUDA elementwise kernels: 16-byte packs, grid size, alignment.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

#include "common/convert.h"

namespace safegene {

constexpr int kPack = 8;           // elements per thread step: 16 bytes of bf16/fp16, 32 of fp32
constexpr int kThreads = 256;

// kPack elements loaded/stored as one (2-byte types) or two (fp32) 16-byte vector accesses.
template <class T>
struct alignas(16) Pack {
  T v[kPack];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Enough blocks to fill the GPU for a grid-stride loop over `items`, never more than needed.
inline unsigned grid_blocks(int64_t items) {
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  const int64_t fill = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, fill)));
}

__device__ __forceinline__ int64_t global_thread() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

}  // namespace safegene
