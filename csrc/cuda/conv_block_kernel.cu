// CUDA kernels of the fused conv block, on the current stream. The
// convolution is cuDNN's (or a cuBLAS GEMM for 1x1) through at::convolution;
// around it, on channels_last tensors seen as rows (N*H*W) x channels:
//   forward:  reflection pad | conv | per-channel sums | normalise + affine + LeakyReLU
//   backward: LeakyReLU-grad + BN-backward sums | conv-output grad | conv backward | un-pad gather
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "dip/conv_block.h"

namespace dip {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename scalar_t>
__global__ void reflect_pad_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t c, int64_t h, int64_t w,
                                   int64_t sn, int64_t sc, int64_t sh, int64_t sw, int64_t pad,
                                   scalar_t* __restrict__ out) {
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad, total = n * hp * wp * c;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % c, j = (i / c) % wp, r = (i / (c * wp)) % hp, b = i / (c * wp * hp);
    out[i] = x[b * sn + k * sc + reflect_index(r - pad, h) * sh + reflect_index(j - pad, w) * sw];
  }
}

template <typename scalar_t>
__global__ void reflect_unpad_kernel(const scalar_t* __restrict__ gp, int64_t n, int64_t c, int64_t h, int64_t w,
                                     int64_t pad, scalar_t* __restrict__ out) {
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad, total = n * h * w * c;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % c, j = (i / c) % w, r = (i / (c * w)) % h, b = i / (c * w * h);
    int64_t rs[3], cs[3];
    const int nr = reflect_sources(r, h, pad, rs), nc = reflect_sources(j, w, pad, cs);
    scalar_t acc = 0;
    for (int a = 0; a < nr; ++a)
      for (int e = 0; e < nc; ++e) acc += gp[((b * hp + rs[a]) * wp + cs[e]) * c + k];
    out[i] = acc;
  }
}

// Per-channel sums over rows: a block covers 32 channels x 8 row lanes,
// accumulates in double, reduces its lanes in shared memory and adds the
// result to the global sums with one atomic per channel.
//   mode 0 (stats):     s += y - y[0],  q += (y - y[0])^2
//   mode 1 (gradients): s += g,         q += g * xhat
template <typename scalar_t, int kMode>
__global__ void channel_sums_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ go,
                                    const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd,
                                    scalar_t slope, int64_t m, int64_t c, double* __restrict__ s,
                                    double* __restrict__ q) {
  __shared__ double ss[8][32], sq[8][32];
  const int64_t k = blockIdx.x * 32 + threadIdx.x;
  double as = 0, aq = 0;
  if (k < c) {
    for (int64_t r = blockIdx.y * 8 + threadIdx.y; r < m; r += int64_t(gridDim.y) * 8) {
      const scalar_t v = y[r * c + k];
      if (kMode == 0) {
        const double d = double(v) - double(y[k]);
        as += d;
        aq += d * d;
      } else {
        const scalar_t z = v * scale[k] + shift[k];
        const scalar_t g = z > scalar_t(0) ? go[r * c + k] : go[r * c + k] * slope;
        as += g;
        aq += double(g) * double((v - mean[k]) * invstd[k]);
      }
    }
  }
  ss[threadIdx.y][threadIdx.x] = as;
  sq[threadIdx.y][threadIdx.x] = aq;
  __syncthreads();
  if (threadIdx.y == 0 && k < c) {
    for (int l = 1; l < 8; ++l) {
      as += ss[l][threadIdx.x];
      aq += sq[l][threadIdx.x];
    }
    atomicAdd(s + k, as);
    atomicAdd(q + k, aq);
  }
}

template <typename scalar_t>
__global__ void bn_act_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ scale,
                              const scalar_t* __restrict__ shift, scalar_t slope, int64_t total, int64_t c,
                              scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % c;
    const scalar_t z = y[i] * scale[k] + shift[k];
    out[i] = z > scalar_t(0) ? z : z * slope;
  }
}

// grad_y = g * scale + xhat * a + b (a = b = 0 in eval mode).
template <typename scalar_t>
__global__ void bn_act_grad_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ go,
                                   const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                   const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd,
                                   const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t slope,
                                   int64_t total, int64_t c, scalar_t* __restrict__ grad_y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % c;
    const scalar_t z = y[i] * scale[k] + shift[k];
    const scalar_t g = z > scalar_t(0) ? go[i] : go[i] * slope;
    grad_y[i] = g * scale[k] + (y[i] - mean[k]) * invstd[k] * a[k] + b[k];
  }
}

// Per-channel statistics and BatchNorm affine in one launch (c threads):
//   training (s != nullptr): mean = y0 + s/m, var = max(q/m - (s/m)^2, 0) from the shifted sums;
//   eval:                    mean, var = the given statistics;
// then invstd = 1/sqrt(var + eps), scale = gamma * invstd, shift = beta - mean * scale.
template <typename scalar_t>
__global__ void stats_affine_kernel(const double* __restrict__ s, const double* __restrict__ q,
                                    const scalar_t* __restrict__ y0, const scalar_t* __restrict__ mean_in,
                                    const scalar_t* __restrict__ var_in, const scalar_t* __restrict__ gamma,
                                    const scalar_t* __restrict__ beta, int64_t c, double m, double eps,
                                    scalar_t* __restrict__ mean_out, scalar_t* __restrict__ var_out,
                                    scalar_t* __restrict__ invstd, scalar_t* __restrict__ scale,
                                    scalar_t* __restrict__ shift) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < c; k += int64_t(gridDim.x) * blockDim.x) {
    scalar_t mu, v;
    if (s != nullptr) {
      const double d = s[k] / m;
      mu = static_cast<scalar_t>(double(y0[k]) + d);
      v = static_cast<scalar_t>(fmax(q[k] / m - d * d, 0.0));
    } else {
      mu = mean_in[k];
      v = var_in[k];
    }
    const scalar_t is = static_cast<scalar_t>(1.0 / sqrt(double(v) + eps));
    const scalar_t sc = gamma[k] * is;
    if (mean_out != nullptr) {
      mean_out[k] = mu;
      var_out[k] = v;
    }
    invstd[k] = is;
    scale[k] = sc;
    shift[k] = beta[k] - mu * sc;
  }
}

// BatchNorm-backward coefficients from the gradient sums sg = sum(g), sgx = sum(g * xhat):
// grad_beta = sg, grad_gamma = sgx, conv-bias gradient (0 under batch statistics, scale * sg in eval),
// and a = -scale * sgx / m, b = -scale * sg / m of grad_y = g * scale + xhat * a + b (0 in eval).
template <typename scalar_t>
__global__ void grad_coefficients_kernel(const double* __restrict__ sg, const double* __restrict__ sgx,
                                         const scalar_t* __restrict__ scale, int64_t c, double m, bool training,
                                         scalar_t* __restrict__ grad_gamma, scalar_t* __restrict__ grad_beta,
                                         scalar_t* __restrict__ grad_bias, scalar_t* __restrict__ a,
                                         scalar_t* __restrict__ b) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < c; k += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t gb = static_cast<scalar_t>(sg[k]);
    grad_beta[k] = gb;
    grad_gamma[k] = static_cast<scalar_t>(sgx[k]);
    grad_bias[k] = training ? scalar_t(0) : scale[k] * gb;
    a[k] = training ? static_cast<scalar_t>(-double(scale[k]) * sgx[k] / m) : scalar_t(0);
    b[k] = training ? static_cast<scalar_t>(-double(scale[k]) * sg[k] / m) : scalar_t(0);
  }
}

// The CUDA kernels convolve in the input's dtype only (see check_same_dtype).
at::Tensor reflect_pad_cuda(const at::Tensor& x, int64_t pad, at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(dtype == x.scalar_type(), "reflect_pad_cuda: no dtype conversion on CUDA");
  auto out = empty_cl({x.size(0), x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad}, x.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dip_reflect_pad_cuda", [&] {
    reflect_pad_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1),
        x.stride(2), x.stride(3), pad, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor reflect_unpad_cuda(const at::Tensor& gp, int64_t pad, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(dtype == gp.scalar_type(), "reflect_unpad_cuda: no dtype conversion on CUDA");
  auto out = empty_cl(sizes, gp.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gp.scalar_type(), "dip_reflect_unpad_cuda", [&] {
    reflect_unpad_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        gp.const_data_ptr<scalar_t>(), sizes[0], sizes[1], sizes[2], sizes[3], pad, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Launches channel_sums_kernel; returns (s, q) as double tensors of c elements.
template <typename scalar_t, int kMode>
std::tuple<at::Tensor, at::Tensor> channel_sums(const at::Tensor& y, const at::Tensor& go, const at::Tensor& scale,
                                                const at::Tensor& shift, const at::Tensor& mean,
                                                const at::Tensor& invstd, double slope) {
  const int64_t c = y.size(1), m = y.numel() / c;
  auto sums = at::zeros({2, c}, y.options().dtype(at::kDouble));  // one fill for both
  auto s = sums[0], q = sums[1];
  if (m == 0) return {s, q};  // an empty grid is an invalid launch
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((c + 31) / 32), static_cast<unsigned>(std::min<int64_t>((m + 7) / 8, 1024)));
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  channel_sums_kernel<scalar_t, kMode><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      y.const_data_ptr<scalar_t>(), ptr(go), ptr(scale), ptr(shift), ptr(mean), ptr(invstd), scalar_t(slope), m, c,
      s.mutable_data_ptr<double>(), q.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s, q};
}

// Launches stats_affine_kernel. Training: pass the sums (s, q) and the conv output y (its first row is
// the shift of the sums); mean and var are written. Eval / backward: pass mean and var, s undefined.
// Returns (mean, var, invstd, scale, shift), each c elements of the input dtype.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_affine(
    const at::Tensor& s, const at::Tensor& q, const at::Tensor& y, const at::Tensor& mean_in,
    const at::Tensor& var_in, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const int64_t c = gamma.numel(), m = s.defined() ? y.numel() / c : 1;
  // Explicit types: these would otherwise be dependent on scalar_t and need `.template` at each call.
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const at::TensorOptions opts = gamma.options().dtype(dtype);
  const at::Tensor coef = at::empty({3, c}, opts);  // invstd, scale, shift (internal)
  const at::Tensor g = gamma.to(dtype).contiguous(), bt = beta.to(dtype).contiguous();
  const bool given = !s.defined();
  const at::Tensor mi = given ? mean_in.to(dtype).contiguous() : at::Tensor();
  const at::Tensor vi = given ? var_in.to(dtype).contiguous() : at::Tensor();
  const at::Tensor mean = given ? mi : at::empty({c}, opts);
  const at::Tensor var = given ? vi : at::empty({c}, opts);
  if (c > 0) {
    stats_affine_kernel<scalar_t><<<blocks_for(c), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        given ? nullptr : s.const_data_ptr<double>(), given ? nullptr : q.const_data_ptr<double>(),
        given ? nullptr : y.const_data_ptr<scalar_t>(), given ? mi.const_data_ptr<scalar_t>() : nullptr,
        given ? vi.const_data_ptr<scalar_t>() : nullptr, g.const_data_ptr<scalar_t>(), bt.const_data_ptr<scalar_t>(),
        c, double(m), eps, given ? nullptr : mean.mutable_data_ptr<scalar_t>(),
        given ? nullptr : var.mutable_data_ptr<scalar_t>(), coef[0].mutable_data_ptr<scalar_t>(),
        coef[1].mutable_data_ptr<scalar_t>(), coef[2].mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {mean, var, coef[0], coef[1], coef[2]};
}

// The CPU kernels take a bfloat16 weight with a float32 input (a bf16
// convolution); these do not: every conv tensor must have the input's dtype.
void check_same_dtype(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, " (CUDA): the weight must have the input's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type(),
              " (a bfloat16 weight with a float32 input, the bf16 convolution, is CPU-only)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, int64_t stride, int64_t padding, bool reflect,
    double eps, double slope) {
  const ConvBlockArgs args{stride, padding, reflect};
  check_same_dtype("conv_block", x, weight);
  check_forward_args(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, args);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto y = block_conv_forward(x, weight, bias, stride, padding, reflect, reflect_pad_cuda);
  const int64_t c = y.size(1), m = y.numel() / c;
  at::Tensor mean, var, invstd, scale, shift;
  if (training) {
    TORCH_CHECK(m > 0, "conv_block: batch statistics of an empty batch (output shape ", y.sizes(), ")");
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dip_conv_block_stats_cuda", [&] {
    if (training) {
      // y's first row (canonical channels_last: its first c elements) shifts the sums, for accuracy.
      auto [s, q] = channel_sums<scalar_t, 0>(y, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                              at::Tensor(), slope);
      std::tie(mean, var, invstd, scale, shift) =
          stats_affine<scalar_t>(s, q, y, at::Tensor(), at::Tensor(), bn_weight, bn_bias, eps);
    } else {
      std::tie(mean, var, invstd, scale, shift) = stats_affine<scalar_t>(
          at::Tensor(), at::Tensor(), y, running_mean->clone(), running_var->clone(), bn_weight, bn_bias, eps);
    }
  });
  auto out = empty_cl(y.sizes(), y.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dip_conv_block_cuda", [&] {
      bn_act_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          y.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(),
          scalar_t(slope), out.numel(), c, out.mutable_data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, y, mean.contiguous(), var.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    bool training, int64_t stride, int64_t padding, bool reflect, double eps, double slope, bool need_grad_input) {
  check_backward_args(grad_out, x, weight, y, mean, var, bn_weight, bn_bias, training,
                      ConvBlockArgs{stride, padding, reflect});
  check_same_dtype("conv_block_backward", x, weight);
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && grad_out.scalar_type() == x.scalar_type(),
              "conv_block_backward (CUDA): grad_out and y must have the input's dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(y.device());
  const auto go = canonical_cl(grad_out);
  const auto yc = canonical_cl(y);
  const int64_t c = y.size(1), m = y.numel() / c;
  auto grad_y = empty_cl(y.sizes(), y.options());
  at::Tensor grad_gamma, grad_beta, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dip_conv_block_backward_cuda", [&] {
    auto [mu, var_used, invstd, scale, shift] =
        stats_affine<scalar_t>(at::Tensor(), at::Tensor(), yc, mean, var, bn_weight, bn_bias, eps);
    auto [sg, sgx] = channel_sums<scalar_t, 1>(yc, go, scale, shift, mu, invstd, slope);
    // grad_gamma, grad_beta, grad_bias (zero under batch statistics, scale * sum(g) in eval): separate
    // tensors, since the op's outputs must not alias each other; a and b share one internal buffer.
    grad_gamma = at::empty({c}, y.options());
    grad_beta = at::empty({c}, y.options());
    grad_bias = at::empty({c}, y.options());
    auto ab = at::empty({2, c}, y.options());
    auto a = ab[0], b = ab[1];
    if (c > 0) {
      grad_coefficients_kernel<scalar_t><<<blocks_for(c), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          sg.const_data_ptr<double>(), sgx.const_data_ptr<double>(), scale.const_data_ptr<scalar_t>(), c, double(m),
          training, grad_gamma.mutable_data_ptr<scalar_t>(), grad_beta.mutable_data_ptr<scalar_t>(),
          grad_bias.mutable_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(), b.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_y.numel() > 0) {
      bn_act_grad_kernel<scalar_t><<<blocks_for(grad_y.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          yc.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          shift.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), scalar_t(slope), grad_y.numel(), c,
          grad_y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  auto [grad_x, grad_weight] =
      block_conv_backward(grad_y, x, weight, stride, padding, reflect, need_grad_input, reflect_pad_cuda, reflect_unpad_cuda);
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace
}  // namespace dip

TORCH_LIBRARY_IMPL(dip, CUDA, m) {
  m.impl("conv_block", &dip::conv_block_cuda);
  m.impl("conv_block_backward", &dip::conv_block_backward_cuda);
}
