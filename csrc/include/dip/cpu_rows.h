// Shared pieces of the CPU kernels that work on channels_last maps viewed as
// rows (N*H*W) x channels: the instruction-set clones of the row loops and
// the reproducible per-channel reduction.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// Row loops are compiled for several instruction sets (target_clones) and the
// best one is picked at load time; restrict pointers and no branches let GCC
// vectorise each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DIP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DIP_CLONES
#endif

namespace dip {

// Rows are split into a fixed number of chunks so reductions give the same
// bits whatever the thread scheduling.
inline int64_t num_chunks(int64_t rows) {
  const int64_t min_rows = 256;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / min_rows));
}

// Per-channel sums s and q of a rows x c block: chunk_sums(r0, r1, s, q) adds
// rows [r0, r1) into one chunk's double partials, and the partials are added
// in chunk order.
template <typename F>
void reduce_rows(int64_t m, int64_t c, std::vector<double>& s, std::vector<double>& q, const F& chunk_sums) {
  const int64_t chunks = num_chunks(m);
  std::vector<double> part(chunks * 2 * c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      chunk_sums(t * m / chunks, (t + 1) * m / chunks, part.data() + t * 2 * c, part.data() + t * 2 * c + c);
    }
  });
  s.assign(c, 0.0);
  q.assign(c, 0.0);
  for (int64_t t = 0; t < chunks; ++t) {
    for (int64_t k = 0; k < c; ++k) {
      s[k] += part[t * 2 * c + k];
      q[k] += part[t * 2 * c + c + k];
    }
  }
}

}  // namespace dip
