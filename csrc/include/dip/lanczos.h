// Lanczos downsampling arithmetic shared by the CPU and CUDA kernels.
//
// One axis of length n is reduced to n_out = n / factor samples. The filter has
// K = 2·support·factor taps (phase 0.5, normalised to sum 1) and the axis is
// replicate-padded by (K − factor) / 2 before and the rest after, as in the
// Python reference (dip/ops/lanczos.py). Output o reads padded samples
// o·factor … o·factor + K − 1, i.e. input samples clamp(o·factor + k − before).
//
// Instead of clamping inside the kernels, each output gets a fixed-width window
// of the *unpadded* input, width = min(K, n), starting at window_start(o), and
// the taps that fall on replicated border samples are folded onto the border
// sample they copy (window_weight). Kernels then run branch-free over
// contiguous windows, and the backward pass is the exact transpose.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIP_HOST_DEVICE __host__ __device__
#else
#define DIP_HOST_DEVICE
#endif

namespace dip {
namespace lanczos {

constexpr int64_t kMinFactor = 2;
constexpr int64_t kMaxFactor = 32;

DIP_HOST_DEVICE inline int64_t num_taps(int64_t factor, int64_t support) {
  return 2 * support * factor;
}

// Replicate padding before the first sample; the padding after is
// num_taps − factor − pad_before (one more than before when factor is odd).
DIP_HOST_DEVICE inline int64_t pad_before(int64_t factor, int64_t support) {
  return (num_taps(factor, support) - factor) / 2;
}

DIP_HOST_DEVICE inline int64_t clamp_index(int64_t i, int64_t lo, int64_t hi) {
  return i < lo ? lo : (i > hi ? hi : i);
}

DIP_HOST_DEVICE inline double sinc(double x) {
  constexpr double kPi = 3.14159265358979323846;
  return x == 0.0 ? 1.0 : sin(kPi * x) / (kPi * x);
}

// Unnormalised tap k of the closed form: sinc(d)·sinc(d/support),
// d = |k + 0.5 − support·factor| / factor.
DIP_HOST_DEVICE inline double raw_tap(int64_t k, int64_t factor, int64_t support) {
  const double d = fabs(static_cast<double>(k) + 0.5 - static_cast<double>(support * factor)) /
                   static_cast<double>(factor);
  return sinc(d) * sinc(d / static_cast<double>(support));
}

// Sum of the raw taps; taps are raw_tap(k) / tap_sum.
DIP_HOST_DEVICE inline double tap_sum(int64_t factor, int64_t support) {
  double s = 0.0;
  const int64_t k_total = num_taps(factor, support);
  for (int64_t k = 0; k < k_total; ++k) {
    s += raw_tap(k, factor, support);
  }
  return s;
}

DIP_HOST_DEVICE inline int64_t window_width(int64_t n, int64_t factor, int64_t support) {
  const int64_t k_total = num_taps(factor, support);
  return k_total < n ? k_total : n;
}

// First input sample of output o's window (windows never leave [0, n)).
DIP_HOST_DEVICE inline int64_t window_start(int64_t o, int64_t n, int64_t factor, int64_t support) {
  const int64_t width = window_width(n, factor, support);
  return clamp_index(o * factor - pad_before(factor, support), 0, n - width);
}

// Normalised weight of input sample window_start(o) + j in output o: the sum of
// the taps k whose clamped position clamp(o·factor + k − before, 0, n − 1)
// is that sample (more than one tap only at the two borders).
DIP_HOST_DEVICE inline double window_weight(
    int64_t o, int64_t j, int64_t n, int64_t factor, int64_t support, double inv_tap_sum) {
  const int64_t k_total = num_taps(factor, support);
  const int64_t base = o * factor - pad_before(factor, support);  // padded origin in input coords
  const int64_t pos = window_start(o, n, factor, support) + j;
  int64_t k_lo = pos == 0 ? 0 : pos - base;
  int64_t k_hi = pos == n - 1 ? k_total - 1 : pos - base;
  k_lo = k_lo < 0 ? 0 : k_lo;
  k_hi = k_hi > k_total - 1 ? k_total - 1 : k_hi;
  double w = 0.0;
  for (int64_t k = k_lo; k <= k_hi; ++k) {
    w += raw_tap(k, factor, support);
  }
  return w * inv_tap_sum;
}

// The outputs whose windows contain input sample i: o in [*lo, *hi] (empty
// when *lo > *hi). Window starts are non-decreasing in o, so this is a range;
// the backward pass gathers over it instead of scattering.
DIP_HOST_DEVICE inline void covering_outputs(
    int64_t i, int64_t n, int64_t n_out, int64_t factor, int64_t support, int64_t* lo, int64_t* hi) {
  const int64_t width = window_width(n, factor, support);
  const int64_t before = pad_before(factor, support);
  // Last o with window_start(o) <= i.
  if (i >= n - width) {
    *hi = n_out - 1;
  } else {
    const int64_t h = (i + before) / factor;
    *hi = h < n_out - 1 ? h : n_out - 1;
  }
  // First o with window_start(o) + width - 1 >= i.
  const int64_t m = i - width + 1;
  *lo = m <= 0 ? 0 : (m + before + factor - 1) / factor;
}

}  // namespace lanczos
}  // namespace dip
