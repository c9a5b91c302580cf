// The index arithmetic of the CUDA kernels' vectorised grid-stride loops, as
// __host__ __device__ code: kernels.cu runs it on the GPU, and a CPU test
// (tests/gpu_ready/test_emulated_grid.py) compiles it with g++ and runs it over an
// emulated grid (every block and thread) for awkward sizes, offsets and SM counts,
// proving that every element is visited exactly once and that only 16-byte aligned
// accesses take the vector path.  Pure integer code: no CUDA or torch header.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define REPTILE_GRID_FN __host__ __device__ __forceinline__
#else
#define REPTILE_GRID_FN inline
#endif

namespace reptile_fused {
namespace grid {

constexpr int kThreads = 256;     // threads per block
constexpr int kBlocksPerSm = 8;   // resident blocks per SM that saturate memory
constexpr int kVectorBytes = 16;  // one 128-bit access

// Elements of `elem_size` bytes in one vector access.
constexpr int vec_of(int elem_size) { return kVectorBytes / elem_size; }

REPTILE_GRID_FN bool aligned16(std::uintptr_t address) { return address % kVectorBytes == 0; }

// An [n, P] buffer's rows all start 16-byte aligned when its first row does and a row
// is a whole number of vectors.
REPTILE_GRID_FN bool rows_aligned(std::uintptr_t base, std::int64_t P, std::int64_t elem_size) {
  return aligned16(base) && (P * elem_size) % kVectorBytes == 0;
}

// Blocks to launch over `numel` elements: one thread per vector (or element), capped at
// kBlocksPerSm blocks per SM (the grid-stride loop covers the rest), at least one.
REPTILE_GRID_FN std::int64_t blocks_for(std::int64_t numel, bool vectorised, int vec, std::int64_t sm_count) {
  const std::int64_t units = vectorised ? (numel + vec - 1) / vec : numel;
  const std::int64_t wanted = (units + kThreads - 1) / kThreads;
  const std::int64_t cap = sm_count * kBlocksPerSm;
  const std::int64_t blocks = wanted < cap ? wanted : cap;
  return blocks < 1 ? 1 : blocks;
}

// A thread's place in a 1-D grid, in 64 bits (a buffer may pass 2**31 elements).
struct Thread {
  std::int64_t index, stride;
};

REPTILE_GRID_FN Thread thread_of(std::int64_t block, std::int64_t block_dim, std::int64_t grid_dim,
                                 std::int64_t thread) {
  return {block * block_dim + thread, grid_dim * block_dim};
}

// The grid-stride loop: VEC-wide accesses over the whole vectors, then the last
// numel % VEC elements one by one.  visit(i, width) with width a
// std::integral_constant<int, VEC or 1>; i is the first element of the access.
template <int VEC, typename Visit>
REPTILE_GRID_FN void for_each(std::int64_t numel, Thread t, Visit&& visit) {
  const std::int64_t full = numel / VEC;
  for (std::int64_t v = t.index; v < full; v += t.stride) visit(v * VEC, std::integral_constant<int, VEC>{});
  if constexpr (VEC > 1) {
    for (std::int64_t i = full * VEC + t.index; i < numel; i += t.stride) visit(i, std::integral_constant<int, 1>{});
  }
}

// Element i of row r in an [n, P] buffer.
REPTILE_GRID_FN std::int64_t row_offset(std::int64_t r, std::int64_t P, std::int64_t i) { return r * P + i; }

}  // namespace grid
}  // namespace reptile_fused
