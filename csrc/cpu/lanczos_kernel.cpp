// CPU kernels of dip::lanczos_downsample and its backward.
//
// Forward, per output row: the window's input rows are combined into one row
// buffer (vertical filter: long contiguous multiply-adds over W), then each
// output pixel is a short dot product over its horizontal window. Border
// replication lives in the folded window weights (dip/lanczos.h), so the loops
// have no clamps.
//
// Backward: each gradient row is spread to full width by the transposed
// horizontal filter (spread_row), kept in a small per-thread ring, and each
// input row gathers the spread rows of the outputs that cover it (transposed
// vertical filter, again long multiply-adds). Gathering means no two threads
// ever write the same row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dip/lanczos.h"
#include "dip/lanczos_checks.h"

// The row primitives are compiled twice, for AVX2+FMA and for the baseline
// ISA, and picked at run time: the extension is built without -march flags so
// that one binary runs on any x86-64. (Explicit dispatch rather than
// target_clones: the ifunc resolvers of GCC 12 pick the baseline clone on
// virtual machines that hide the OSXSAVE bit although AVX2 is usable.)
#if defined(__GNUC__) && defined(__x86_64__)
#define DIP_ROW_BODY inline __attribute__((always_inline))
#define DIP_ROW_PRIMITIVE(name)                                                    \
  template <typename... Args>                                                      \
  __attribute__((target("avx2,fma"))) void name##_avx2(Args... args) {             \
    name##_body(args...);                                                          \
  }                                                                                \
  template <typename... Args>                                                      \
  void name(Args... args) {                                                        \
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); \
    if (avx2) {                                                                    \
      name##_avx2(args...);                                                        \
    } else {                                                                       \
      name##_body(args...);                                                        \
    }                                                                              \
  }
#else
#define DIP_ROW_BODY inline
#define DIP_ROW_PRIMITIVE(name)        \
  template <typename... Args>          \
  void name(Args... args) {            \
    name##_body(args...);              \
  }
#endif

namespace dip {
namespace {

using namespace dip::lanczos;

// Window starts and folded weights of every output along one axis.
template <typename scalar_t>
struct AxisWindows {
  int64_t n_out;
  int64_t width;
  std::vector<int64_t> start;     // n_out
  std::vector<scalar_t> weight;   // n_out × width

  AxisWindows(int64_t n, int64_t factor, int64_t support)
      : n_out(n / factor), width(window_width(n, factor, support)), start(n_out), weight(n_out * width) {
    const double inv_sum = 1.0 / tap_sum(factor, support);
    for (int64_t o = 0; o < n_out; ++o) {
      start[o] = window_start(o, n, factor, support);
      for (int64_t j = 0; j < width; ++j) {
        weight[o * width + j] = static_cast<scalar_t>(window_weight(o, j, n, factor, support, inv_sum));
      }
    }
  }
};

// dst[:n] (=, or += when kAccumulate) Σ_r weight[r] · rows[r][:n] for R rows
// in one sweep over dst. (`omp simd`: dst never overlaps the rows, so the
// compiler needs no run-time alias checks.)
template <int R, bool kAccumulate, typename scalar_t>
DIP_ROW_BODY void sweep_rows(scalar_t* __restrict dst, const scalar_t* const* rows, const scalar_t* weight,
                             int64_t n) {
  scalar_t w[R];
  const scalar_t* __restrict s[R];
  for (int r = 0; r < R; ++r) {
    w[r] = weight[r];
    s[r] = rows[r];
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    scalar_t acc = kAccumulate ? dst[i] : scalar_t(0);
    for (int r = 0; r < R; ++r) acc += w[r] * s[r][i];
    dst[i] = acc;
  }
}

// dst[:n] = Σ_j weight[j] · rows[j][:n], j < count (count ≥ 1): the vertical
// filter (forward) and the transposed vertical filter (backward) of one row,
// four rows per sweep over dst.
template <typename scalar_t>
DIP_ROW_BODY void combine_rows_body(scalar_t* __restrict dst, const scalar_t* const* rows,
                                    const scalar_t* weight, int64_t count, int64_t n) {
  int64_t j = std::min<int64_t>(count, 4);
  switch (j) {
    case 4: sweep_rows<4, false>(dst, rows, weight, n); break;
    case 3: sweep_rows<3, false>(dst, rows, weight, n); break;
    case 2: sweep_rows<2, false>(dst, rows, weight, n); break;
    default: sweep_rows<1, false>(dst, rows, weight, n); break;
  }
  for (; j + 4 <= count; j += 4) sweep_rows<4, true>(dst, rows + j, weight + j, n);
  switch (count - j) {
    case 3: sweep_rows<3, true>(dst, rows + j, weight + j, n); break;
    case 2: sweep_rows<2, true>(dst, rows + j, weight + j, n); break;
    case 1: sweep_rows<1, true>(dst, rows + j, weight + j, n); break;
    default: break;
  }
}
DIP_ROW_PRIMITIVE(combine_rows)

// out[o] = Σ_k weight[o·width + k] · row[start[o] + k]: horizontal filter and stride.
template <typename scalar_t>
DIP_ROW_BODY void window_dots_body(scalar_t* __restrict out, const scalar_t* __restrict row,
                                const int64_t* __restrict start, const scalar_t* __restrict weight, int64_t n_out,
                                int64_t width) {
  for (int64_t o = 0; o < n_out; ++o) {
    const scalar_t* __restrict w = weight + o * width;
    const scalar_t* __restrict s = row + start[o];
    scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < width; ++k) acc += w[k] * s[k];
    out[o] = acc;
  }
}
DIP_ROW_PRIMITIVE(window_dots)

// row[:n] = the transpose of the horizontal filter applied to q[:n_out].
//
// Scattering each q[o] through its window makes every store overlap the
// previous one partially, which stalls store-to-load forwarding. Instead, in
// padded coordinates (window o = taps t at o·factor) sample b·factor + r
// receives Σ_m t[m·factor + r] · q[b − m]: for each phase r that is a short
// convolution of q, vectorised over b, into `phase` (n_out + 2·support − 1
// entries). Samples in the padding fold onto the border sample they replicate.
template <typename scalar_t>
DIP_ROW_BODY void spread_row_body(scalar_t* __restrict row, int64_t n, const scalar_t* __restrict q, int64_t n_out,
                                  const scalar_t* __restrict taps, int64_t factor, int64_t support,
                                  scalar_t* __restrict phase) {
  const int64_t before = pad_before(factor, support);
  const int64_t span = 2 * support;  // taps per phase
  const int64_t blocks = n_out + span - 1;
  scalar_t low = 0, high = 0;
  for (int64_t r = 0; r < factor; ++r) {
    std::fill(phase, phase + blocks, scalar_t(0));
    for (int64_t m = 0; m < span; ++m) {
      const scalar_t t = taps[m * factor + r];
      scalar_t* __restrict dst = phase + m;
#pragma omp simd
      for (int64_t o = 0; o < n_out; ++o) dst[o] += t * q[o];
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i = b * factor + r - before;
      if (i < 0) {
        low += phase[b];
      } else if (i >= n) {
        high += phase[b];
      } else {
        row[i] = phase[b];
      }
    }
  }
  row[0] += low;
  row[n - 1] += high;
}
DIP_ROW_PRIMITIVE(spread_row)

// Rows handled per task: enough multiply-adds to amortise the task overhead.
int64_t grain_rows(int64_t macs_per_row) {
  constexpr int64_t kMacsPerTask = 1 << 15;
  return 1 + kMacsPerTask / std::max<int64_t>(macs_per_row, 1);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* y, int64_t planes, int64_t h, int64_t w, int64_t factor,
                    int64_t support) {
  const AxisWindows<scalar_t> rows(h, factor, support);
  const AxisWindows<scalar_t> cols(w, factor, support);
  const int64_t ho = rows.n_out, wo = cols.n_out;

  at::parallel_for(0, planes * ho, grain_rows(rows.width * w), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buffer(w);
    std::vector<const scalar_t*> window(rows.width);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / ho, oy = r % ho;
      const scalar_t* first = x + (p * h + rows.start[oy]) * w;
      for (int64_t j = 0; j < rows.width; ++j) window[j] = first + j * w;
      combine_rows(buffer.data(), window.data(), rows.weight.data() + oy * rows.width, rows.width, w);
      window_dots(y + r * wo, buffer.data(), cols.start.data(), cols.weight.data(), wo, cols.width);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* g, scalar_t* gx, int64_t planes, int64_t h, int64_t w, int64_t factor,
                     int64_t support) {
  const AxisWindows<scalar_t> rows(h, factor, support);
  const int64_t ho = rows.n_out, wo = w / factor;

  const int64_t k_total = num_taps(factor, support);
  const double inv_sum = 1.0 / tap_sum(factor, support);
  std::vector<scalar_t> taps(k_total);
  for (int64_t k = 0; k < k_total; ++k) taps[k] = static_cast<scalar_t>(raw_tap(k, factor, support) * inv_sum);

  // Input row iy gathers from the outputs lo(iy)..hi(iy) that cover it; both
  // bounds are non-decreasing in iy, so a ring of max_cover rows holds every
  // spread gradient row a task still needs, each computed once per task.
  int64_t max_cover = 1;
  for (int64_t iy = 0; iy < h; ++iy) {
    int64_t lo, hi;
    covering_outputs(iy, h, ho, factor, support, &lo, &hi);
    max_cover = std::max(max_cover, hi - lo + 1);
  }

  at::parallel_for(0, planes * h, grain_rows(max_cover * w), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> ring(max_cover * w);
    std::vector<const scalar_t*> gathered(max_cover);
    std::vector<scalar_t> coeff(max_cover);
    std::vector<scalar_t> phase(wo + 2 * support - 1);
    int64_t plane = -1, next_oy = 0;  // spread rows of `plane` below next_oy are in the ring
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / h, iy = r % h;
      scalar_t* out = gx + r * w;
      int64_t lo, hi;
      covering_outputs(iy, h, ho, factor, support, &lo, &hi);
      if (lo > hi) {
        std::fill(out, out + w, scalar_t(0));
        continue;
      }
      if (p != plane) {
        plane = p;
        next_oy = lo;
      }
      next_oy = std::max(next_oy, lo);
      // Spread the new gradient rows through the transposed horizontal filter.
      for (; next_oy <= hi; ++next_oy) {
        spread_row(ring.data() + (next_oy % max_cover) * w, w, g + (p * ho + next_oy) * wo, wo, taps.data(),
                   factor, support, phase.data());
      }
      // Transposed vertical filter: gx[iy] = Σ_oy V[oy, iy] · spread[oy].
      for (int64_t oy = lo; oy <= hi; ++oy) {
        gathered[oy - lo] = ring.data() + (oy % max_cover) * w;
        coeff[oy - lo] = rows.weight[oy * rows.width + (iy - rows.start[oy])];
      }
      combine_rows(out, gathered.data(), coeff.data(), hi - lo + 1, w);
    }
  });
}

at::Tensor lanczos_downsample_cpu(const at::Tensor& x, int64_t factor, int64_t support) {
  check_forward(x, factor, support);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  check_cpu_dtype("lanczos_downsample", x);
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor y = at::empty({n, c, h / factor, w / factor}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lanczos_downsample_cpu", [&] {
    forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n * c, h, w, factor, support);
  });
  return y;
}

at::Tensor lanczos_downsample_backward_cpu(const at::Tensor& grad_output, int64_t factor, int64_t support,
                                           int64_t height, int64_t width) {
  check_backward(grad_output, factor, support, height, width);
  TORCH_INTERNAL_ASSERT(grad_output.device().is_cpu());
  check_cpu_dtype("_lanczos_downsample_backward", grad_output);
  const at::Tensor gc = grad_output.contiguous();
  const int64_t n = gc.size(0), c = gc.size(1);
  at::Tensor gx = at::empty({n, c, height, width}, gc.options());
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "lanczos_downsample_backward_cpu", [&] {
    backward_kernel<scalar_t>(gc.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n * c, height, width, factor,
                              support);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip, CPU, m) {
  m.impl("lanczos_downsample", &lanczos_downsample_cpu);
  m.impl("_lanczos_downsample_backward", &lanczos_downsample_backward_cpu);
}

}  // namespace dip
