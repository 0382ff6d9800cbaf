// CPU kernels of the fused conv block. The convolution itself is oneDNN's (or
// an MKL GEMM for 1x1); these kernels fuse everything around it, on
// channels_last tensors viewed as rows (N*H*W) x channels:
//   forward:  reflection pad (one copy) | conv | batch statistics (one pass)
//             | normalise + affine + LeakyReLU (one pass)
//   backward: LeakyReLU-grad + BN-backward reductions (one pass) | grad of the
//             conv output (one pass) | conv backward | un-pad accumulation (one pass)
//
// With a bfloat16 weight and a float32 input (the op's bf16 mode, chosen by
// the Python wrapper under CPU bf16 autocast) the convolution runs in bf16:
// the padding copy converts the input, the conv output y and its gradient are
// bf16, and everything else (statistics, normalisation, activation, the
// block's output, the input gradient) is float32. The element-wise passes read
// and write y in its own type and compute in the input's (conv_t vs scalar_t).
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dip/conv_block.h"
#include "dip/cpu_rows.h"

namespace dip {
namespace {

// Element access in a storage type, computing in float or double. bfloat16 is
// converted on its bits, with the values of c10's conversions (round to
// nearest even, NaN kept), in a form GCC vectorises.
inline float load(at::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(float v) { return v; }
inline double load(double v) { return v; }

inline void put(float v, at::BFloat16& d) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  d.x = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
}
inline void put(float v, float& d) { d = v; }
inline void put(double v, double& d) { d = v; }

DIP_CLONES void convert_row(const float* __restrict s, at::BFloat16* __restrict d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) put(s[k], d[k]);
}
DIP_CLONES void convert_row(const at::BFloat16* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] = load(s[k]);
}
DIP_CLONES void accumulate_row(const at::BFloat16* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] += load(s[k]);
}

// d[0, n) = s[0, n) converted to D.
template <typename S, typename D>
inline void copy_row(const S* s, D* d, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(d, s, n * sizeof(S));
  } else {
    convert_row(s, d, n);
  }
}

// d[0, n) += s[0, n) (in D's arithmetic).
template <typename S, typename D>
inline void add_row(const S* s, D* d, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) d[k] += s[k];
  } else {
    accumulate_row(s, d, n);
  }
}

// Calls f(conv_t()) with conv_t the element type of the convolution: the
// input's scalar_t, or BFloat16 for a float32 input with a bf16 weight.
template <typename scalar_t, typename F>
void with_conv_type(at::ScalarType conv_dtype, const F& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (conv_dtype == at::kBFloat16) {
      f(at::BFloat16());
      return;
    }
  }
  const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  TORCH_CHECK(conv_dtype == dtype, "conv_block: a ", conv_dtype, " convolution of a ", dtype,
              " input is not supported");
  f(scalar_t());
}

template <typename src_t, typename dst_t>
void reflect_pad_kernel(const at::Tensor& x, int64_t pad, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const src_t* src = x.const_data_ptr<src_t>();
  dst_t* dst = out.mutable_data_ptr<dst_t>();
  const bool channels_inner = sc == 1;
  at::parallel_for(0, n * hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / hp, i = r % hp;
      const src_t* srow = src + b * sn + reflect_index(i - pad, h) * sh;
      dst_t* drow = dst + r * wp * c;
      for (int64_t j = 0; j < wp; ++j) {
        const src_t* s = srow + reflect_index(j - pad, w) * sw;
        dst_t* d = drow + j * c;
        if (channels_inner) {
          copy_row(s, d, c);
        } else {
          for (int64_t k = 0; k < c; ++k) put(load(s[k * sc]), d[k]);
        }
      }
    }
  });
}

// x (any strides) -> channels_last copy in dtype, reflection-padded by pad on each side.
at::Tensor reflect_pad(const at::Tensor& x, int64_t pad, at::ScalarType dtype) {
  auto out = empty_cl({x.size(0), x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_reflect_pad", [&] {
    with_conv_type<scalar_t>(dtype, [&](auto conv) { reflect_pad_kernel<scalar_t, decltype(conv)>(x, pad, out); });
  });
  return out;
}

// Adjoint of reflect_pad: each source pixel gathers the (up to 3 x 3) padded
// pixels that copied it, so the result is written once, with no zero-fill.
template <typename src_t, typename dst_t>
void reflect_unpad_kernel(const at::Tensor& gp, int64_t pad, at::Tensor& out) {
  const int64_t n = out.size(0), c = out.size(1), h = out.size(2), w = out.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  const src_t* src = gp.const_data_ptr<src_t>();
  dst_t* dst = out.mutable_data_ptr<dst_t>();
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    int64_t rsrc[3], csrc[3];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      const int nr = reflect_sources(i, h, pad, rsrc);
      for (int64_t j = 0; j < w; ++j) {
        const int nc = reflect_sources(j, w, pad, csrc);
        dst_t* d = dst + (r * w + j) * c;
        bool first = true;
        for (int a = 0; a < nr; ++a) {
          for (int e = 0; e < nc; ++e) {
            const src_t* s = src + ((b * hp + rsrc[a]) * wp + csrc[e]) * c;
            if (first) {
              copy_row(s, d, c);
              first = false;
            } else {
              add_row(s, d, c);
            }
          }
        }
      }
    }
  });
}

// The gradient of reflect_pad's input, in dtype, from gp (the padded gradient, in the convolution's dtype).
at::Tensor reflect_unpad(const at::Tensor& gp, int64_t pad, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto out = empty_cl(sizes, gp.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "dip_reflect_unpad", [&] {
    with_conv_type<scalar_t>(gp.scalar_type(),
                             [&](auto conv) { reflect_unpad_kernel<decltype(conv), scalar_t>(gp, pad, out); });
  });
  return out;
}

// In the row kernels, y (the conv output) and grad_y are stored as Y and every
// other array is T, the arithmetic type: (float, float), (double, double), or
// (BFloat16, float) for a bf16 convolution.
template <typename Y, typename T>
inline void stats_row(const Y* __restrict y, const Y* __restrict y0, T* __restrict s, T* __restrict q, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T d = load(y[k]) - load(y0[k]);
    s[k] += d;
    q[k] += d * d;
  }
}

template <typename Y, typename T>
inline void bn_act_row(const Y* __restrict y, const T* __restrict scale, const T* __restrict shift, T slope,
                       T* __restrict out, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T z = load(y[k]) * scale[k] + shift[k];
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

template <typename Y, typename T>
inline void bn_act_grad_sums_row(const Y* __restrict y, const T* __restrict go, const T* __restrict scale,
                                 const T* __restrict shift, const T* __restrict mean, const T* __restrict invstd,
                                 T slope, T* __restrict sg, T* __restrict sgx, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T v = load(y[k]);
    const T g = act_grad(v * scale[k] + shift[k], go[k], slope);
    sg[k] += g;
    sgx[k] += g * ((v - mean[k]) * invstd[k]);
  }
}

template <typename Y, typename T>
inline void bn_act_grad_row(const Y* __restrict y, const T* __restrict go, const T* __restrict scale,
                            const T* __restrict shift, const T* __restrict mean, const T* __restrict invstd,
                            const T* __restrict a, const T* __restrict b, T slope, Y* __restrict grad_y, int64_t c) {
  for (int64_t k = 0; k < c; ++k) {
    const T v = load(y[k]);
    const T g = act_grad(v * scale[k] + shift[k], go[k], slope);
    put(g * scale[k] + ((v - mean[k]) * invstd[k]) * a[k] + b[k], grad_y[k]);
  }
}

// Column sums are accumulated in T over runs of this many rows (vectorised),
// then added into double, so long sums keep their precision.
constexpr int64_t kRunRows = 16;

template <typename Y, typename T>
struct RowSums {
  // Rows [r0, r1) of y (and go), reduced into s and q (double, c each).
  static void stats(const Y* y, int64_t r0, int64_t r1, int64_t c, double* s, double* q);
  static void grad_sums(const Y* y, const T* go, const T* scale, const T* shift, const T* mean, const T* invstd,
                        T slope, int64_t r0, int64_t r1, int64_t c, double* s, double* q);
  static void bn_act(const Y* y, const T* scale, const T* shift, T slope, T* out, int64_t r0, int64_t r1, int64_t c);
  static void bn_act_grad(const Y* y, const T* go, const T* scale, const T* shift, const T* mean, const T* invstd,
                          const T* a, const T* b, T slope, Y* grad_y, int64_t r0, int64_t r1, int64_t c);
};

template <typename T>
void flush(const std::vector<T>& run, int64_t c, double* s, double* q) {
  for (int64_t k = 0; k < c; ++k) {
    s[k] += run[k];
    q[k] += run[c + k];
  }
}

#define DIP_ROW_SUMS(Y, T)                                                                                           \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<Y, T>::stats(const Y* y, int64_t r0, int64_t r1, int64_t c, double* s, double* q) {       \
    std::vector<T> run(2 * c);                                                                                      \
    for (int64_t a = r0; a < r1; a += kRunRows) {                                                                   \
      std::fill(run.begin(), run.end(), T(0));                                                                      \
      for (int64_t r = a; r < std::min(a + kRunRows, r1); ++r) stats_row(y + r * c, y, run.data(), run.data() + c, c); \
      flush(run, c, s, q);                                                                                          \
    }                                                                                                               \
  }                                                                                                                 \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<Y, T>::grad_sums(const Y* y, const T* go, const T* scale, const T* shift, const T* mean,  \
                                           const T* invstd, T slope, int64_t r0, int64_t r1, int64_t c, double* s,  \
                                           double* q) {                                                             \
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
  DIP_CLONES void RowSums<Y, T>::bn_act(const Y* y, const T* scale, const T* shift, T slope, T* out, int64_t r0,    \
                                        int64_t r1, int64_t c) {                                                    \
    for (int64_t r = r0; r < r1; ++r) bn_act_row(y + r * c, scale, shift, slope, out + r * c, c);                   \
  }                                                                                                                 \
  template <>                                                                                                       \
  DIP_CLONES void RowSums<Y, T>::bn_act_grad(const Y* y, const T* go, const T* scale, const T* shift,               \
                                             const T* mean, const T* invstd, const T* a, const T* b, T slope,       \
                                             Y* grad_y, int64_t r0, int64_t r1, int64_t c) {                        \
    for (int64_t r = r0; r < r1; ++r) {                                                                             \
      bn_act_grad_row(y + r * c, go + r * c, scale, shift, mean, invstd, a, b, slope, grad_y + r * c, c);           \
    }                                                                                                               \
  }

DIP_ROW_SUMS(float, float)
DIP_ROW_SUMS(double, double)
DIP_ROW_SUMS(at::BFloat16, float)
#undef DIP_ROW_SUMS

// Per-channel mean and biased variance of a rows x c matrix, summed around a
// per-channel shift (the first row) so that large means do not cancel the
// variance.
template <typename Y, typename T>
void channel_stats(const Y* y, int64_t m, int64_t c, T* mean, T* var) {
  std::vector<double> s, q;
  reduce_rows(m, c, s, q, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
    RowSums<Y, T>::stats(y, r0, r1, c, ps, pq);
  });
  for (int64_t k = 0; k < c; ++k) {
    const double mu = s[k] / m;
    mean[k] = T(double(load(y[k])) + mu);
    var[k] = T(std::max(q[k] / m - mu * mu, 0.0));
  }
}

// out = LeakyReLU(y * scale + shift) with scale = gamma * invstd and
// shift = beta - mean * scale: BatchNorm's normalise and affine in one FMA.
template <typename Y, typename T>
void bn_act_forward(const Y* y, int64_t m, int64_t c, const T* scale, const T* shift, T slope, T* out) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    RowSums<Y, T>::bn_act(y, scale, shift, slope, out, begin, end, c);
  });
}

// Backward of bn_act_forward. With g = grad_out * LeakyReLU'(z) and
// xhat = (y - mean) * invstd, the BN gradients are sum(g) and sum(g * xhat),
// and the conv-output gradient is gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))
// in training mode (batch statistics), gamma * invstd * g in eval mode.
template <typename Y, typename T>
void bn_act_backward(const T* go, const Y* y, int64_t m, int64_t c, const T* mean, const T* invstd, const T* scale,
                     const T* shift, T slope, bool training, Y* grad_y, T* grad_gamma, T* grad_beta) {
  std::vector<double> sg, sgx;
  reduce_rows(m, c, sg, sgx, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
    RowSums<Y, T>::grad_sums(y, go, scale, shift, mean, invstd, slope, r0, r1, c, ps, pq);
  });
  std::vector<T> a(c), b(c);  // grad_y = g * scale + xhat * a + b
  for (int64_t k = 0; k < c; ++k) {
    grad_beta[k] = T(sg[k]);
    grad_gamma[k] = T(sgx[k]);
    a[k] = training ? T(-double(scale[k]) * sgx[k] / m) : T(0);
    b[k] = training ? T(-double(scale[k]) * sg[k] / m) : T(0);
  }
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    RowSums<Y, T>::bn_act_grad(y, go, scale, shift, mean, invstd, a.data(), b.data(), slope, grad_y, begin, end, c);
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
  const auto y = block_conv_forward(x, weight, bias, stride, padding, reflect, reflect_pad);  // weight's dtype
  const int64_t c = y.size(1), m = y.numel() / c;
  auto mean = at::empty({c}, x.options());
  auto var = at::empty({c}, x.options());
  auto out = empty_cl(y.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_conv_block_cpu", [&] {
    with_conv_type<scalar_t>(y.scalar_type(), [&](auto conv) {
      using conv_t = decltype(conv);
      if (training) {
        channel_stats<conv_t, scalar_t>(y.const_data_ptr<conv_t>(), m, c, mean.mutable_data_ptr<scalar_t>(),
                                        var.mutable_data_ptr<scalar_t>());
      } else {
        mean.copy_(*running_mean);
        var.copy_(*running_var);
      }
      std::vector<scalar_t> invstd, scale, shift;
      affine_of<scalar_t>(mean, var, bn_weight, bn_bias, eps, invstd, scale, shift);
      bn_act_forward<conv_t, scalar_t>(y.const_data_ptr<conv_t>(), m, c, scale.data(), shift.data(), scalar_t(slope),
                                       out.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, y, mean, var};
}

// grad_x, grad_bn_weight and grad_bn_bias have x's dtype; the conv-output
// gradient, grad_weight and grad_bias have the weight's (y's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    bool training, int64_t stride, int64_t padding, bool reflect, double eps, double slope, bool need_grad_input) {
  check_backward_args(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training,
                      ConvBlockArgs{stride, padding, reflect});
  const auto go = canonical_cl(grad_out, x.scalar_type());
  const auto yc = canonical_cl(y);
  const int64_t c = y.size(1), m = y.numel() / c;
  auto grad_y = empty_cl(y.sizes(), y.options());
  auto grad_gamma = at::empty({c}, x.options());
  auto grad_beta = at::empty({c}, x.options());
  auto grad_bias = at::empty({c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_conv_block_backward_cpu", [&] {
    std::vector<scalar_t> invstd, scale, shift;
    affine_of<scalar_t>(mean, var, bn_weight, bn_bias, eps, invstd, scale, shift);
    auto mu = mean.contiguous();
    with_conv_type<scalar_t>(y.scalar_type(), [&](auto conv) {
      using conv_t = decltype(conv);
      bn_act_backward<conv_t, scalar_t>(go.const_data_ptr<scalar_t>(), yc.const_data_ptr<conv_t>(), m, c,
                                        mu.const_data_ptr<scalar_t>(), invstd.data(), scale.data(), shift.data(),
                                        scalar_t(slope), training, grad_y.mutable_data_ptr<conv_t>(),
                                        grad_gamma.mutable_data_ptr<scalar_t>(),
                                        grad_beta.mutable_data_ptr<scalar_t>());
    });
    // The conv bias shifts y and its batch mean alike, so in training mode its
    // gradient is exactly zero; in eval mode it is sum(grad_y) = scale * sum(g).
    auto* gb = grad_bias.mutable_data_ptr<scalar_t>();
    const auto* sg = grad_beta.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < c; ++k) gb[k] = training ? scalar_t(0) : scale[k] * sg[k];
  });
  auto [grad_x, grad_weight] =
      block_conv_backward(grad_y, x, weight, stride, padding, reflect, need_grad_input, reflect_pad, reflect_unpad);
  return {grad_x, grad_weight, grad_bias.to(weight.scalar_type()), grad_gamma, grad_beta};
}

}  // namespace
}  // namespace dip

TORCH_LIBRARY_IMPL(dip, CPU, m) {
  m.impl("conv_block", &dip::conv_block_cpu);
  m.impl("conv_block_backward", &dip::conv_block_backward_cpu);
}
