// Taps of bilinear x2 upsampling with align_corners=False (PyTorch's
// convention), shared by the kernels and usable from CUDA code.
//
// Along one axis of length n, output o reads source position o / 2 - 0.25
// clamped at 0, so
//   out[2i]     = 0.75 x[i] + 0.25 x[max(i - 1, 0)]
//   out[2i + 1] = 0.75 x[i] + 0.25 x[min(i + 1, n - 1)]
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DIP_UP_HD __host__ __device__ __forceinline__
#else
#define DIP_UP_HD inline
#endif

namespace dip {

// The two source indices of output o and their weights.
DIP_UP_HD void up2_taps(int64_t o, int64_t n, int64_t* i0, int64_t* i1) {
  const int64_t i = o >> 1;
  *i0 = i;
  *i1 = (o & 1) ? (i + 1 < n ? i + 1 : n - 1) : (i > 0 ? i - 1 : 0);
}

// Adjoint: the weight that source index i has in output o (0 when none).
DIP_UP_HD double up2_weight(int64_t o, int64_t i, int64_t n) {
  if (o < 0 || o >= 2 * n) return 0.0;
  int64_t a, b;
  up2_taps(o, n, &a, &b);
  return (a == i ? 0.75 : 0.0) + (b == i ? 0.25 : 0.0);
}

// The (up to 4) outputs that read source index i, with their weights; returns how many.
DIP_UP_HD int up2_sources(int64_t i, int64_t n, int64_t* out, double* weight) {
  int k = 0;
  for (int64_t o = 2 * i - 1; o <= 2 * i + 2; ++o) {
    const double w = up2_weight(o, i, n);
    if (w != 0.0) {
      out[k] = o;
      weight[k] = w;
      ++k;
    }
  }
  return k;
}

}  // namespace dip
