// CPU kernels of the fused conv block. The convolution itself is oneDNN's (or
// an MKL GEMM for 1x1); these kernels fuse everything around it, on
// channels_last tensors viewed as rows (N*H*W) x channels:
//   forward:  reflection pad (one copy) | conv | batch statistics (one pass)
//             | normalise + affine + LeakyReLU (one pass)
//   backward: LeakyReLU-grad + BN-backward reductions (one pass) | grad of the
//             conv output (one pass) | conv backward | un-pad accumulation (one pass)
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dip/conv_block.h"

namespace dip {
namespace {

// Rows are split into a fixed number of chunks so reductions give the same
// bits whatever the thread scheduling.
int64_t num_chunks(int64_t rows) {
  const int64_t min_rows = 256;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / min_rows));
}

template <typename scalar_t>
void reflect_pad_kernel(const at::Tensor& x, int64_t pad, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const bool channels_inner = sc == 1;
  at::parallel_for(0, n * hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / hp, i = r % hp;
      const scalar_t* srow = src + b * sn + reflect_index(i - pad, h) * sh;
      scalar_t* drow = dst + r * wp * c;
      for (int64_t j = 0; j < wp; ++j) {
        const scalar_t* s = srow + reflect_index(j - pad, w) * sw;
        scalar_t* d = drow + j * c;
        if (channels_inner) {
          std::memcpy(d, s, c * sizeof(scalar_t));
        } else {
          for (int64_t k = 0; k < c; ++k) d[k] = s[k * sc];
        }
      }
    }
  });
}

// x (any strides) -> channels_last copy reflection-padded by pad on each side.
at::Tensor reflect_pad(const at::Tensor& x, int64_t pad) {
  auto out = empty_cl({x.size(0), x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_reflect_pad", [&] { reflect_pad_kernel<scalar_t>(x, pad, out); });
  return out;
}

// Adjoint of reflect_pad: each source pixel gathers the (up to 3 x 3) padded
// pixels that copied it, so the result is written once, with no zero-fill.
template <typename scalar_t>
void reflect_unpad_kernel(const at::Tensor& gp, int64_t pad, at::Tensor& out) {
  const int64_t n = out.size(0), c = out.size(1), h = out.size(2), w = out.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  const scalar_t* src = gp.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    int64_t rsrc[3], csrc[3];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      const int nr = reflect_sources(i, h, pad, rsrc);
      for (int64_t j = 0; j < w; ++j) {
        const int nc = reflect_sources(j, w, pad, csrc);
        scalar_t* d = dst + (r * w + j) * c;
        bool first = true;
        for (int a = 0; a < nr; ++a) {
          for (int e = 0; e < nc; ++e) {
            const scalar_t* s = src + ((b * hp + rsrc[a]) * wp + csrc[e]) * c;
            if (first) {
              std::memcpy(d, s, c * sizeof(scalar_t));
              first = false;
            } else {
#pragma omp simd
              for (int64_t k = 0; k < c; ++k) d[k] += s[k];
            }
          }
        }
      }
    }
  });
}

at::Tensor reflect_unpad(const at::Tensor& gp, int64_t pad, at::IntArrayRef sizes) {
  auto out = empty_cl(sizes, gp.options());
  AT_DISPATCH_FLOATING_TYPES(gp.scalar_type(), "dip_reflect_unpad",
                             [&] { reflect_unpad_kernel<scalar_t>(gp, pad, out); });
  return out;
}

// Row kernels: one row of c channels, restrict pointers and no branches so
// that GCC vectorises them; every rows-loop below is compiled for several
// instruction sets (target_clones) and the best one is picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DIP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DIP_CLONES
#endif

template <typename T>
inline void stats_row(const T* __restrict y, const T* __restrict y0, T* __restrict s, T* __restrict q, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T d = y[k] - y0[k];
    s[k] += d;
    q[k] += d * d;
  }
}

template <typename T>
inline void bn_act_row(const T* __restrict y, const T* __restrict scale, const T* __restrict shift, T slope,
                       T* __restrict out, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T z = y[k] * scale[k] + shift[k];
    out[k] = std::max(z, T(0)) + slope * std::min(z, T(0));  // LeakyReLU, exact for both signs
  }
}

// LeakyReLU'(z) * grad as pos * g + (1 - pos) * slope * g with pos = (z > 0):
// exact, and free of the select that stops vectorisation.
template <typename T>
inline T act_grad(T z, T g, T slope) {
  const T pos = T(z > T(0));
  return pos * g + (T(1) - pos) * (slope * g);
}

template <typename T>
inline void bn_act_grad_sums_row(const T* __restrict y, const T* __restrict go, const T* __restrict scale,
                                 const T* __restrict shift, const T* __restrict mean, const T* __restrict invstd,
                                 T slope, T* __restrict sg, T* __restrict sgx, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T g = act_grad(y[k] * scale[k] + shift[k], go[k], slope);
    sg[k] += g;
    sgx[k] += g * ((y[k] - mean[k]) * invstd[k]);
  }
}

template <typename T>
inline void bn_act_grad_row(const T* __restrict y, const T* __restrict go, const T* __restrict scale,
                            const T* __restrict shift, const T* __restrict mean, const T* __restrict invstd,
                            const T* __restrict a, const T* __restrict b, T slope, T* __restrict grad_y, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T g = act_grad(y[k] * scale[k] + shift[k], go[k], slope);
    grad_y[k] = g * scale[k] + ((y[k] - mean[k]) * invstd[k]) * a[k] + b[k];
  }
}

// Column sums are accumulated in T over runs of this many rows (vectorised),
// then added into double, so long sums keep their precision.
constexpr int64_t kRunRows = 16;

template <typename T>
struct RowSums {
  // Rows [r0, r1) of y (and go), reduced into s and q (double, c each).
  static void stats(const T* y, int64_t r0, int64_t r1, int64_t c, double* s, double* q);
  static void grad_sums(const T* y, const T* go, const T* scale, const T* shift, const T* mean, const T* invstd,
                        T slope, int64_t r0, int64_t r1, int64_t c, double* s, double* q);
  static void bn_act(const T* y, const T* scale, const T* shift, T slope, T* out, int64_t r0, int64_t r1, int64_t c);
  static void bn_act_grad(const T* y, const T* go, const T* scale, const T* shift, const T* mean, const T* invstd,
                          const T* a, const T* b, T slope, T* grad_y, int64_t r0, int64_t r1, int64_t c);
};

template <typename T>
void flush(const std::vector<T>& run, int64_t c, double* s, double* q) {
  for (int64_t k = 0; k < c; ++k) {
    s[k] += run[k];
    q[k] += run[c + k];
  }
}

#define DIP_ROW_SUMS(T)                                                                                              \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<T>::stats(const T* y, int64_t r0, int64_t r1, int64_t c, double* s, double* q) {          \
    std::vector<T> run(2 * c);                                                                                      \
    for (int64_t a = r0; a < r1; a += kRunRows) {                                                                   \
      std::fill(run.begin(), run.end(), T(0));                                                                      \
      for (int64_t r = a; r < std::min(a + kRunRows, r1); ++r) stats_row(y + r * c, y, run.data(), run.data() + c, c); \
      flush(run, c, s, q);                                                                                          \
    }                                                                                                               \
  }                                                                                                                 \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<T>::grad_sums(const T* y, const T* go, const T* scale, const T* shift, const T* mean,     \
                                        const T* invstd, T slope, int64_t r0, int64_t r1, int64_t c, double* s,     \
                                        double* q) {                                                                \
    std::vector<T> run(2 * c);                                                                                      \
    for (int64_t a = r0; a < r1; a += kRunRows) {                                                                   \
      std::fill(run.begin(), run.end(), T(0));                                                                      \
      for (int64_t r = a; r < std::min(a + kRunRows, r1); ++r) {                                                    \
        bn_act_grad_sums_row(y + r * c, go + r * c, scale, shift, mean, invstd, slope, run.data(), run.data() + c,  \
                             c);                                                                                    \
      }                                                                                                             \
      flush(run, c, s, q);                                                                                          \
    }                                                                                                               \
  }                                                                                                                 \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<T>::bn_act(const T* y, const T* scale, const T* shift, T slope, T* out, int64_t r0,       \
                                     int64_t r1, int64_t c) {                                                       \
    for (int64_t r = r0; r < r1; ++r) bn_act_row(y + r * c, scale, shift, slope, out + r * c, c);                   \
  }                                                                                                                 \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<T>::bn_act_grad(const T* y, const T* go, const T* scale, const T* shift, const T* mean,   \
                                          const T* invstd, const T* a, const T* b, T slope, T* grad_y, int64_t r0,  \
                                          int64_t r1, int64_t c) {                                                  \
    for (int64_t r = r0; r < r1; ++r) {                                                                             \
      bn_act_grad_row(y + r * c, go + r * c, scale, shift, mean, invstd, a, b, slope, grad_y + r * c, c);           \
    }                                                                                                               \
  }

DIP_ROW_SUMS(float)
DIP_ROW_SUMS(double)
#undef DIP_ROW_SUMS

// Reduces rows x c in a fixed number of chunks, each with its own double
// partial sums, then adds the partials in chunk order (reproducible).
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

// Per-channel mean and biased variance of a rows x c matrix, summed around a
// per-channel shift (the first row) so that large means do not cancel the
// variance.
template <typename scalar_t>
void channel_stats(const scalar_t* y, int64_t m, int64_t c, scalar_t* mean, scalar_t* var) {
  std::vector<double> s, q;
  reduce_rows(m, c, s, q, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
    RowSums<scalar_t>::stats(y, r0, r1, c, ps, pq);
  });
  for (int64_t k = 0; k < c; ++k) {
    const double mu = s[k] / m;
    mean[k] = scalar_t(double(y[k]) + mu);
    var[k] = scalar_t(std::max(q[k] / m - mu * mu, 0.0));
  }
}

// out = LeakyReLU(y * scale + shift) with scale = gamma * invstd and
// shift = beta - mean * scale: BatchNorm's normalise and affine in one FMA.
template <typename scalar_t>
void bn_act_forward(const scalar_t* y, int64_t m, int64_t c, const scalar_t* scale, const scalar_t* shift,
                    scalar_t slope, scalar_t* out) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    RowSums<scalar_t>::bn_act(y, scale, shift, slope, out, begin, end, c);
  });
}

// Backward of bn_act_forward. With g = grad_out * LeakyReLU'(z) and
// xhat = (y - mean) * invstd, the BN gradients are sum(g) and sum(g * xhat),
// and the conv-output gradient is gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))
// in training mode (batch statistics), gamma * invstd * g in eval mode.
template <typename scalar_t>
void bn_act_backward(const scalar_t* go, const scalar_t* y, int64_t m, int64_t c, const scalar_t* mean,
                     const scalar_t* invstd, const scalar_t* scale, const scalar_t* shift, scalar_t slope,
                     bool training, scalar_t* grad_y, scalar_t* grad_gamma, scalar_t* grad_beta) {
  std::vector<double> sg, sgx;
  reduce_rows(m, c, sg, sgx, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
    RowSums<scalar_t>::grad_sums(y, go, scale, shift, mean, invstd, slope, r0, r1, c, ps, pq);
  });
  std::vector<scalar_t> a(c), b(c);  // grad_y = g * scale + xhat * a + b
  for (int64_t k = 0; k < c; ++k) {
    grad_beta[k] = scalar_t(sg[k]);
    grad_gamma[k] = scalar_t(sgx[k]);
    a[k] = training ? scalar_t(-double(scale[k]) * sgx[k] / m) : scalar_t(0);
    b[k] = training ? scalar_t(-double(scale[k]) * sg[k] / m) : scalar_t(0);
  }
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    RowSums<scalar_t>::bn_act_grad(y, go, scale, shift, mean, invstd, a.data(), b.data(), slope, grad_y, begin, end,
                                   c);
  });
}

// Per-channel scale = gamma / sqrt(var + eps), shift = beta - mean * scale, and invstd.
template <typename scalar_t>
void affine_of(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
               double eps, std::vector<scalar_t>& invstd, std::vector<scalar_t>& scale, std::vector<scalar_t>& shift) {
  const int64_t c = mean.numel();
  auto mu = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous(), bt = beta.contiguous();
  const scalar_t *pm = mu.const_data_ptr<scalar_t>(), *pv = v.const_data_ptr<scalar_t>();
  const scalar_t *pg = g.const_data_ptr<scalar_t>(), *pb = bt.const_data_ptr<scalar_t>();
  invstd.resize(c);
  scale.resize(c);
  shift.resize(c);
  for (int64_t k = 0; k < c; ++k) {
    invstd[k] = scalar_t(1.0 / std::sqrt(double(pv[k]) + eps));
    scale[k] = pg[k] * invstd[k];
    shift[k] = pb[k] - pm[k] * scale[k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, int64_t stride, int64_t padding, bool reflect,
    double eps, double slope) {
  const ConvBlockArgs args{stride, padding, reflect};
  check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, args);
  const auto y = block_conv_forward(x, weight, bias, stride, padding, reflect, reflect_pad);
  const int64_t c = y.size(1), m = y.numel() / c;
  auto mean = at::empty({c}, x.options());
  auto var = at::empty({c}, x.options());
  auto out = empty_cl(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_conv_block_cpu", [&] {
    if (training) {
      channel_stats<scalar_t>(y.const_data_ptr<scalar_t>(), m, c, mean.mutable_data_ptr<scalar_t>(),
                              var.mutable_data_ptr<scalar_t>());
    } else {
      mean.copy_(*running_mean);
      var.copy_(*running_var);
    }
    std::vector<scalar_t> invstd, scale, shift;
    affine_of<scalar_t>(mean, var, bn_weight, bn_bias, eps, invstd, scale, shift);
    bn_act_forward<scalar_t>(y.const_data_ptr<scalar_t>(), m, c, scale.data(), shift.data(), scalar_t(slope),
                             out.mutable_data_ptr<scalar_t>());
  });
  return {out, y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    bool training, int64_t stride, int64_t padding, bool reflect, double eps, double slope, bool need_grad_input) {
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "conv_block_backward: grad_out must have the output's shape ",
              y.sizes(), ", got ", grad_out.sizes());
  const auto go = canonical_cl(grad_out);
  const auto yc = canonical_cl(y);
  const int64_t c = y.size(1), m = y.numel() / c;
  auto grad_y = empty_cl(y.sizes(), y.options());
  auto grad_gamma = at::empty({c}, y.options());
  auto grad_beta = at::empty({c}, y.options());
  auto grad_bias = at::empty({c}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dip_conv_block_backward_cpu", [&] {
    std::vector<scalar_t> invstd, scale, shift;
    affine_of<scalar_t>(mean, var, bn_weight, bn_bias, eps, invstd, scale, shift);
    auto mu = mean.contiguous();
    bn_act_backward<scalar_t>(go.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(), m, c,
                              mu.const_data_ptr<scalar_t>(), invstd.data(), scale.data(), shift.data(),
                              scalar_t(slope), training, grad_y.mutable_data_ptr<scalar_t>(),
                              grad_gamma.mutable_data_ptr<scalar_t>(), grad_beta.mutable_data_ptr<scalar_t>());
    // The conv bias shifts y and its batch mean alike, so in training mode its
    // gradient is exactly zero; in eval mode it is sum(grad_y) = scale * sum(g).
    auto* gb = grad_bias.mutable_data_ptr<scalar_t>();
    const auto* sg = grad_beta.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < c; ++k) gb[k] = training ? scalar_t(0) : scale[k] * sg[k];
  });
  auto [grad_x, grad_weight] =
      block_conv_backward(grad_y, x, weight, stride, padding, reflect, need_grad_input, reflect_pad, reflect_unpad);
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace dip

TORCH_LIBRARY_IMPL(dip, CPU, m) {
  m.impl("conv_block", &dip::conv_block_cpu);
  m.impl("conv_block_backward", &dip::conv_block_backward_cpu);
}
