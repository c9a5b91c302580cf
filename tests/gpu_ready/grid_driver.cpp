// Runs the CUDA kernels' index arithmetic (csrc/grid.h) over an emulated grid on
// the CPU: every block and every thread of the launch that kernels.cu's launch() would
// make, each running the grid-stride loop that flat_kernel runs.  Prints one line per
// failed check and "checked N cases" at the end; exit status 1 on any failure.
//
// Built by tests/gpu_ready/test_emulated_grid.py with g++ -std=c++17 (no CUDA needed).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "grid.h"

namespace g = reptile_fused::grid;

static int failures = 0;
static long cases = 0;

#define CHECK(cond, ...)                    \
  do {                                      \
    if (!(cond)) {                          \
      if (++failures <= 20) {               \
        std::printf("FAIL: " __VA_ARGS__);  \
        std::printf("\n");                  \
      }                                     \
    }                                       \
  } while (0)

// What launch() decides for a flat op: the vector path when every buffer's start
// (offset elements into a 16-byte aligned allocation) is aligned.
template <int VEC>
void flat_case(std::int64_t numel, std::int64_t offset, int elem_size, std::int64_t sms) {
  ++cases;
  const std::uintptr_t base = 4096 + static_cast<std::uintptr_t>(offset) * elem_size;
  const bool aligned = g::aligned16(base);
  const std::int64_t blocks = g::blocks_for(numel, aligned, VEC, sms);
  CHECK(blocks >= 1 && blocks <= sms * g::kBlocksPerSm, "blocks %lld for numel %lld", (long long)blocks, (long long)numel);
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(numel), 0);
  std::int64_t vector_visits = 0, max_chunks = 0;
  auto run = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    for (std::int64_t b = 0; b < blocks; ++b) {
      for (std::int64_t t = 0; t < g::kThreads; ++t) {
        std::int64_t chunks = 0;
        g::for_each<V>(numel, g::thread_of(b, g::kThreads, blocks, t), [&](std::int64_t i, auto width) {
          constexpr int W = decltype(width)::value;
          CHECK(i >= 0 && i + W <= numel, "access [%lld, %lld) outside [0, %lld)", (long long)i, (long long)(i + W),
                (long long)numel);
          if (W > 1) {
            ++vector_visits;
            ++chunks;
            CHECK(g::aligned16(base + static_cast<std::uintptr_t>(i) * elem_size),
                  "vector access at element %lld not 16-byte aligned (offset %lld)", (long long)i, (long long)offset);
            CHECK(W * elem_size == 16, "vector of %d elements of %d bytes", W, elem_size);
          }
          for (int k = 0; k < W && i + k < numel && i + k >= 0; ++k) seen[static_cast<std::size_t>(i + k)]++;
        });
        if (chunks > max_chunks) max_chunks = chunks;
      }
    }
  };
  if (aligned) {
    run(std::integral_constant<int, VEC>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  for (std::int64_t i = 0; i < numel; ++i) {
    if (seen[static_cast<std::size_t>(i)] != 1) {
      CHECK(false, "numel %lld offset %lld vec %d sms %lld: element %lld visited %d times", (long long)numel,
            (long long)offset, VEC, (long long)sms, (long long)i, seen[static_cast<std::size_t>(i)]);
      break;
    }
  }
  CHECK(aligned || vector_visits == 0, "unaligned buffer took the vector path");
  CHECK(!aligned || numel < VEC || vector_visits == numel / VEC, "aligned buffer: %lld vector accesses, want %lld",
        (long long)vector_visits, (long long)(numel / VEC));
  std::printf("case numel=%lld offset=%lld vec=%d sms=%lld aligned=%d blocks=%lld max_chunks=%lld\n", (long long)numel,
              (long long)offset, VEC, (long long)sms, aligned ? 1 : 0, (long long)blocks, (long long)max_chunks);
}

// batched_meta_update_: each visit of element i of theta touches element i of every row.
template <int VEC>
void rows_case(std::int64_t P, std::int64_t n_rows, std::int64_t offset, int elem_size, std::int64_t sms) {
  ++cases;
  const std::uintptr_t base = 4096 + static_cast<std::uintptr_t>(offset) * elem_size;
  const bool aligned = g::rows_aligned(base, P, elem_size);  // theta is a fresh allocation
  const std::int64_t blocks = g::blocks_for(P, aligned, VEC, sms);
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(P * n_rows), 0);
  auto run = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    for (std::int64_t b = 0; b < blocks; ++b)
      for (std::int64_t t = 0; t < g::kThreads; ++t)
        g::for_each<V>(P, g::thread_of(b, g::kThreads, blocks, t), [&](std::int64_t i, auto width) {
          constexpr int W = decltype(width)::value;
          for (std::int64_t r = 0; r < n_rows; ++r) {
            const std::int64_t at = g::row_offset(r, P, i);
            if (W > 1)
              CHECK(g::aligned16(base + static_cast<std::uintptr_t>(at) * elem_size),
                    "row %lld: vector access at %lld not aligned (P %lld, offset %lld)", (long long)r, (long long)at,
                    (long long)P, (long long)offset);
            for (int k = 0; k < W; ++k) seen[static_cast<std::size_t>(at + k)]++;
          }
        });
  };
  if (aligned) {
    run(std::integral_constant<int, VEC>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  for (std::int64_t j = 0; j < P * n_rows; ++j) {
    if (seen[static_cast<std::size_t>(j)] != 1) {
      CHECK(false, "rows P %lld n %lld offset %lld: element %lld visited %d times", (long long)P, (long long)n_rows,
            (long long)offset, (long long)j, seen[static_cast<std::size_t>(j)]);
      break;
    }
  }
  std::printf("rows P=%lld n=%lld offset=%lld vec=%d aligned=%d\n", (long long)P, (long long)n_rows, (long long)offset,
              VEC, aligned ? 1 : 0);
}

// Beyond 2**31 elements: one thread's loop (the whole grid is too big to emulate) must
// stay in 64 bits, reach the last whole vector and the tail, in order, without overflow.
template <int VEC>
void huge_case(std::int64_t numel, std::int64_t sms) {
  ++cases;
  const std::int64_t blocks = g::blocks_for(numel, true, VEC, sms);
  CHECK(blocks == sms * g::kBlocksPerSm, "huge: blocks %lld", (long long)blocks);
  const std::int64_t threads = blocks * g::kThreads;
  const std::int64_t full = numel / VEC;
  for (std::int64_t tid : {std::int64_t(0), threads - 1, (full % threads)}) {
    std::int64_t last = -1, visits = 0, tail_visits = 0;
    g::for_each<VEC>(numel, g::thread_of(tid / g::kThreads, g::kThreads, blocks, tid % g::kThreads),
                     [&](std::int64_t i, auto width) {
                       constexpr int W = decltype(width)::value;
                       CHECK(i > last && i + W <= numel, "huge: access %lld after %lld (numel %lld)", (long long)i,
                             (long long)last, (long long)numel);
                       last = i;
                       ++visits;
                       if (W == 1) ++tail_visits;
                     });
    const std::int64_t want_vec = full > tid ? (full - 1 - tid) / threads + 1 : 0;
    const std::int64_t tail = numel - full * VEC;
    const std::int64_t want_tail = tid < tail ? 1 : 0;
    CHECK(visits == want_vec + want_tail, "huge: thread %lld made %lld accesses, want %lld", (long long)tid,
          (long long)visits, (long long)(want_vec + want_tail));
    CHECK(tail_visits == want_tail, "huge: thread %lld tail %lld", (long long)tid, (long long)tail_visits);
    if (want_tail) CHECK(last == full * VEC + tid, "huge: tail element %lld", (long long)last);
  }
  // A row offset past 2**31 in an [n, P] buffer.
  CHECK(g::row_offset(3, numel, numel - 1) == 4 * numel - 1, "row_offset overflow");
  std::printf("huge numel=%lld vec=%d\n", (long long)numel, VEC);
}

template <int VEC>
void sweep(int elem_size) {
  const std::int64_t sms_list[] = {1, 3};
  for (std::int64_t sms : sms_list) {
    const std::int64_t threads = sms * g::kBlocksPerSm * g::kThreads;
    // Awkward sizes: empty tails, tails of every length, one thread short of a full
    // grid, and several chunks per thread (up to 3 * threads vectors and a tail).
    const std::int64_t sizes[] = {1,           VEC - 1 > 0 ? VEC - 1 : 1, VEC,         VEC + 1,        2 * VEC + 3,
                                  1023,        1025,                      threads * VEC - 1, threads * VEC, threads * VEC + 1,
                                  threads * VEC + VEC - 1, 2 * threads * VEC + 5, 3 * threads * VEC + VEC + 3};
    for (std::int64_t n : sizes)
      for (std::int64_t offset : {0, 1, 3, VEC, VEC + 1}) flat_case<VEC>(n, offset, elem_size, sms);
  }
  for (std::int64_t P : {std::int64_t(1), std::int64_t(VEC), std::int64_t(VEC + 3), std::int64_t(5000), std::int64_t(4096 * VEC)})
    for (std::int64_t n_rows : {1, 3})
      for (std::int64_t offset : {0, 1}) rows_case<VEC>(P, n_rows, offset, elem_size, 1);
  huge_case<VEC>((std::int64_t(1) << 31) + 5, 132);
  huge_case<VEC>((std::int64_t(1) << 33) + VEC + 1, 132);
}

int main() {
  sweep<4>(4);  // float32
  sweep<2>(8);  // float64
  sweep<8>(2);  // float16 / bfloat16
  std::printf("checked %ld cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
