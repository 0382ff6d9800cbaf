// CPU kernels of the decoder's merge: concatenation of two channels_last maps
// along channels followed by BatchNorm (no activation), written straight into
// one channels_last output; the backward writes the two inputs' gradients
// directly, so there is no concatenated copy and no sliced gradient to copy.
//   forward:  statistics of a and b (one pass) | normalise both into out (one pass)
//   backward: per-channel sums of g and g * xhat (one pass) | both input gradients (one pass)
// With groups G (the members of a seed ensemble side by side) a and b hold G
// blocks of channels each and the output interleaves them member by member:
// [a_1, b_1, a_2, b_2, ...]. Each such block is a Segment below.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dip/conv_block.h"
#include "dip/cpu_rows.h"
#include "dip/merge_bn.h"

namespace dip {
namespace {

constexpr int64_t kRun = 16;  // rows summed in T before flushing into double

// Sums over rows [r0, r1) of (x - x0) and (x - x0)^2, x with row stride ld, c channels.
template <typename T>
DIP_CLONES void shifted_sums(const T* x, int64_t ld, int64_t c, int64_t r0, int64_t r1, double* s, double* q) {
  std::vector<T> run(2 * c);
  T* __restrict rs = run.data();
  T* __restrict rq = run.data() + c;
  for (int64_t a = r0; a < r1; a += kRun) {
    std::fill(run.begin(), run.end(), T(0));
    for (int64_t r = a; r < std::min(a + kRun, r1); ++r) {
      const T* __restrict row = x + r * ld;
      for (int64_t k = 0; k < c; ++k) {
        const T d = row[k] - x[k];
        rs[k] += d;
        rq[k] += d * d;
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      s[k] += rs[k];
      q[k] += rq[k];
    }
  }
}

// Sums over rows of g and g * (x - mean) * invstd (g with row stride ldg, x with ldx).
template <typename T>
DIP_CLONES void grad_sums(const T* g, int64_t ldg, const T* x, int64_t ldx, const T* mean, const T* invstd,
                             int64_t c, int64_t r0, int64_t r1, double* s, double* q) {
  std::vector<T> run(2 * c);
  T* __restrict rs = run.data();
  T* __restrict rq = run.data() + c;
  for (int64_t a = r0; a < r1; a += kRun) {
    std::fill(run.begin(), run.end(), T(0));
    for (int64_t r = a; r < std::min(a + kRun, r1); ++r) {
      const T* __restrict gr = g + r * ldg;
      const T* __restrict xr = x + r * ldx;
      for (int64_t k = 0; k < c; ++k) {
        rs[k] += gr[k];
        rq[k] += gr[k] * ((xr[k] - mean[k]) * invstd[k]);
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      s[k] += rs[k];
      q[k] += rq[k];
    }
  }
}

// out = x * scale + shift on rows [r0, r1) (x row stride ldx, out row stride ldo).
template <typename T>
DIP_CLONES void affine_rows(const T* x, int64_t ldx, const T* scale, const T* shift, T* out, int64_t ldo, int64_t c,
                               int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    T* __restrict o = out + r * ldo;
    for (int64_t k = 0; k < c; ++k) o[k] = xr[k] * scale[k] + shift[k];
  }
}

// grad = g * scale + xhat * a + b with xhat = (x - mean) * invstd (out with row stride ldx, like x).
template <typename T>
DIP_CLONES void grad_rows(const T* g, int64_t ldg, const T* x, int64_t ldx, const T* mean, const T* invstd,
                             const T* scale, const T* ca, const T* cb, T* out, int64_t c, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict gr = g + r * ldg;
    const T* __restrict xr = x + r * ldx;
    T* __restrict o = out + r * ldx;
    for (int64_t k = 0; k < c; ++k) o[k] = gr[k] * scale[k] + ((xr[k] - mean[k]) * invstd[k]) * ca[k] + cb[k];
  }
}

// A block of channels of one input (part 0: a, part 1: b) and where it lands in the output.
struct Segment {
  int part;
  int64_t src;    // first channel in its input
  int64_t out;    // first channel in the output
  int64_t width;  // channels
};

// The output's channels in order: member by member, a's block then b's.
std::vector<Segment> segments(int64_t ca, int64_t cb, int64_t groups) {
  const int64_t sa = ca / groups, sb = cb / groups;
  std::vector<Segment> segs;
  for (int64_t g = 0; g < groups; ++g) {
    segs.push_back({0, g * sa, g * (sa + sb), sa});
    segs.push_back({1, g * sb, g * (sa + sb) + sa, sb});
  }
  return segs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_bn_cpu(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& gamma, const at::Tensor& beta,
                                                            const c10::optional<at::Tensor>& running_mean,
                                                            const c10::optional<at::Tensor>& running_var,
                                                            bool training, double eps, int64_t groups) {
  merge::check_forward(a, b, gamma, beta, running_mean, running_var, training, groups);
  const int64_t ca = a.size(1), cb = b.size(1), c = ca + cb;
  const auto ac = canonical_cl(a), bc = canonical_cl(b);
  const int64_t m = a.size(0) * a.size(2) * a.size(3);  // pixels (a part may have no channels)
  const int64_t ld[2] = {ca, cb};
  const auto segs = segments(ca, cb, groups);
  auto out = empty_cl({a.size(0), c, a.size(2), a.size(3)}, a.options());
  auto mean = at::empty({c}, a.options()), var = at::empty({c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dip_merge_bn_cpu", [&] {
    using T = scalar_t;
    const T* parts[2] = {ac.const_data_ptr<T>(), bc.const_data_ptr<T>()};
    if (training) {
      T* pm = mean.mutable_data_ptr<T>();
      T* pv = var.mutable_data_ptr<T>();
      std::vector<double> s, q;
      reduce_rows(m, c, s, q, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
        for (const auto& sg : segs) {
          shifted_sums<T>(parts[sg.part] + sg.src, ld[sg.part], sg.width, r0, r1, ps + sg.out, pq + sg.out);
        }
      });
      for (const auto& sg : segs) {
        for (int64_t k = 0; k < sg.width; ++k) {
          const int64_t o = sg.out + k;
          const double mu = s[o] / m;
          pm[o] = T(double(parts[sg.part][sg.src + k]) + mu);
          pv[o] = T(std::max(q[o] / m - mu * mu, 0.0));
        }
      }
    } else {
      mean.copy_(*running_mean);
      var.copy_(*running_var);
    }
    auto g = gamma.contiguous(), bt = beta.contiguous();
    const T *pm = mean.const_data_ptr<T>(), *pv = var.const_data_ptr<T>();
    const T *pg = g.const_data_ptr<T>(), *pbt = bt.const_data_ptr<T>();
    std::vector<T> scale(c), shift(c);
    for (int64_t k = 0; k < c; ++k) {
      scale[k] = T(double(pg[k]) / std::sqrt(double(pv[k]) + eps));
      shift[k] = pbt[k] - pm[k] * scale[k];
    }
    T* po = out.mutable_data_ptr<T>();
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (const auto& sg : segs) {
        affine_rows<T>(parts[sg.part] + sg.src, ld[sg.part], scale.data() + sg.out, shift.data() + sg.out,
                       po + sg.out, c, sg.width, r0, r1);
      }
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_bn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& gamma, bool training, double eps, int64_t groups) {
  merge::check_backward(grad_out, a, b, mean, var, gamma, training, groups);
  const int64_t ca = a.size(1), cb = b.size(1), c = ca + cb;
  const auto go = canonical_cl(grad_out), ac = canonical_cl(a), bc = canonical_cl(b);
  const int64_t m = a.size(0) * a.size(2) * a.size(3);  // pixels (a part may have no channels)
  const int64_t ld[2] = {ca, cb};
  const auto segs = segments(ca, cb, groups);
  auto grad_a = empty_cl(a.sizes(), a.options()), grad_b = empty_cl(b.sizes(), b.options());
  auto grad_gamma = at::empty({c}, a.options()), grad_beta = at::empty({c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dip_merge_bn_backward_cpu", [&] {
    using T = scalar_t;
    auto mu = mean.contiguous(), v = var.contiguous(), g = gamma.contiguous();
    const T *pm = mu.const_data_ptr<T>(), *pv = v.const_data_ptr<T>(), *pg = g.const_data_ptr<T>();
    std::vector<T> invstd(c), scale(c), ka(c), kb(c);
    for (int64_t k = 0; k < c; ++k) {
      invstd[k] = T(1.0 / std::sqrt(double(pv[k]) + eps));
      scale[k] = pg[k] * invstd[k];
    }
    const T* pgo = go.const_data_ptr<T>();
    const T* parts[2] = {ac.const_data_ptr<T>(), bc.const_data_ptr<T>()};
    T* grads[2] = {grad_a.mutable_data_ptr<T>(), grad_b.mutable_data_ptr<T>()};
    std::vector<double> s, q;
    reduce_rows(m, c, s, q, [&](int64_t r0, int64_t r1, double* ps, double* pq) {
      for (const auto& sg : segs) {
        grad_sums<T>(pgo + sg.out, c, parts[sg.part] + sg.src, ld[sg.part], pm + sg.out, invstd.data() + sg.out,
                     sg.width, r0, r1, ps + sg.out, pq + sg.out);
      }
    });
    T* pgg = grad_gamma.mutable_data_ptr<T>();
    T* pgb = grad_beta.mutable_data_ptr<T>();
    for (int64_t k = 0; k < c; ++k) {
      pgb[k] = T(s[k]);
      pgg[k] = T(q[k]);
      ka[k] = training ? T(-double(scale[k]) * q[k] / m) : T(0);
      kb[k] = training ? T(-double(scale[k]) * s[k] / m) : T(0);
    }
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (const auto& sg : segs) {
        const int64_t o = sg.out;
        grad_rows<T>(pgo + o, c, parts[sg.part] + sg.src, ld[sg.part], pm + o, invstd.data() + o, scale.data() + o,
                     ka.data() + o, kb.data() + o, grads[sg.part] + sg.src, sg.width, r0, r1);
      }
    });
  });
  return {grad_a, grad_b, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace dip

TORCH_LIBRARY_IMPL(dip, CPU, m) {
  m.impl("merge_bn", &dip::merge_bn_cpu);
  m.impl("merge_bn_backward", &dip::merge_bn_backward_cpu);
}
