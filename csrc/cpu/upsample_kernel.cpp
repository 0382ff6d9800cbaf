// CPU kernels of bilinear x2 upsampling (align_corners=False) on
// channels_last tensors: every output pixel is 4 taps of contiguous channel
// rows, and the backward gathers the (up to 4 x 4) output pixels that read
// each input pixel, so neither pass zero-fills, scatters or changes layout.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <vector>

#include "dip/conv_block.h"
#include "dip/cpu_rows.h"
#include "dip/upsample.h"

namespace dip {
namespace {

// d = wa * a + wb * b over c channels.
template <typename T>
inline void mix2(T* __restrict d, const T* __restrict a, const T* __restrict b, T wa, T wb, int64_t c) {
  for (int64_t k = 0; k < c; ++k) d[k] = wa * a[k] + wb * b[k];
}

// d += w * a over c channels.
template <typename T>
inline void axpy(T* __restrict d, const T* __restrict a, T w, int64_t c) {
  for (int64_t k = 0; k < c; ++k) d[k] += w * a[k];
}

// One output row: out row (2w pixels) from input rows r0 (weight 0.75) and r1 (0.25).
// tmp holds the vertically mixed input row (w pixels).
template <typename T>
DIP_CLONES void up_row(const T* r0, const T* r1, T* tmp, T* out, int64_t w, int64_t c) {
  for (int64_t j = 0; j < w; ++j) mix2(tmp + j * c, r0 + j * c, r1 + j * c, T(0.75), T(0.25), c);
  for (int64_t o = 0; o < 2 * w; ++o) {
    int64_t j0, j1;
    up2_taps(o, w, &j0, &j1);
    mix2(out + o * c, tmp + j0 * c, tmp + j1 * c, T(0.75), T(0.25), c);
  }
}

template <typename scalar_t>
void upsample_forward_kernel(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, n * 2 * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> tmp(w * c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (2 * h), o = r % (2 * h);
      int64_t i0, i1;
      up2_taps(o, h, &i0, &i1);
      const scalar_t* img = src + b * h * w * c;
      up_row<scalar_t>(img + i0 * w * c, img + i1 * w * c, tmp.data(), dst + r * 2 * w * c, w, c);
    }
  });
}

// One input row of the gradient: rows (of 2w pixels) gathered with their
// weights into tmp, then each input pixel gathers its (up to 4) columns.
template <typename T>
DIP_CLONES void up_grad_row(const T* const* rows, const T* rw, int nr, T* tmp, T* out, int64_t w, int64_t c) {
  mix2(tmp, rows[0], rows[1], rw[0], rw[1], 2 * w * c);
  for (int a = 2; a < nr; ++a) axpy(tmp, rows[a], rw[a], 2 * w * c);
  for (int64_t j = 0; j < w; ++j) {
    int64_t cols[4];
    double cw[4];
    const int nc = up2_sources(j, w, cols, cw);
    T* d = out + j * c;
    mix2(d, tmp + cols[0] * c, tmp + cols[1] * c, T(cw[0]), T(cw[1]), c);
    for (int e = 2; e < nc; ++e) axpy(d, tmp + cols[e] * c, T(cw[e]), c);
  }
}

template <typename scalar_t>
void upsample_backward_kernel(const at::Tensor& g, at::Tensor& out) {
  const int64_t n = out.size(0), c = out.size(1), h = out.size(2), w = out.size(3);
  const scalar_t* src = g.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> tmp(2 * w * c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      int64_t orow[4];
      double ow[4];
      const int nr = up2_sources(i, h, orow, ow);  // always at least 2
      const scalar_t* rows[4];
      scalar_t rw[4];
      for (int a = 0; a < nr; ++a) {
        rows[a] = src + (b * 2 * h + orow[a]) * 2 * w * c;
        rw[a] = scalar_t(ow[a]);
      }
      up_grad_row<scalar_t>(rows, rw, nr, tmp.data(), dst + r * w * c, w, c);
    }
  });
}

void check_input(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 4, what, ": input must be N x C x H x W, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, what,
              ": only float32 and float64 are supported, got ", t.scalar_type());
}

at::Tensor upsample_bilinear2x_cpu(const at::Tensor& x) {
  check_input(x, "upsample_bilinear2x");
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "upsample_bilinear2x: empty spatial size ", x.sizes());
  const auto xc = canonical_cl(x);
  auto out = empty_cl({x.size(0), x.size(1), 2 * x.size(2), 2 * x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_upsample_bilinear2x",
                             [&] { upsample_forward_kernel<scalar_t>(xc, out); });
  return out;
}

at::Tensor upsample_bilinear2x_backward_cpu(const at::Tensor& grad, int64_t height, int64_t width) {
  check_input(grad, "_upsample_bilinear2x_backward");
  TORCH_CHECK(height > 0 && width > 0 && grad.size(2) == 2 * height && grad.size(3) == 2 * width,
              "_upsample_bilinear2x_backward: gradient ", grad.sizes(), " does not match an input of ", height, " x ",
              width);
  const auto gc = canonical_cl(grad);
  auto out = empty_cl({grad.size(0), grad.size(1), height, width}, grad.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dip_upsample_bilinear2x_backward",
                             [&] { upsample_backward_kernel<scalar_t>(gc, out); });
  return out;
}

}  // namespace
}  // namespace dip

TORCH_LIBRARY_IMPL(dip, CPU, m) {
  m.impl("upsample_bilinear2x", &dip::upsample_bilinear2x_cpu);
  m.impl("_upsample_bilinear2x_backward", &dip::upsample_bilinear2x_backward_cpu);
}
