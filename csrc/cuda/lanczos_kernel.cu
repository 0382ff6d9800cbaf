// CUDA kernels of dip::lanczos_downsample and its backward.
//
// Both directions are two separable passes through a float (double for
// double inputs) intermediate of N·C × H/f × W: the pass along H reads
// coalesced rows, the pass along W reads short contiguous windows. The window
// starts, folded border weights and covering ranges come from dip/lanczos.h,
// the same functions the CPU kernels use; the weights are tabulated once per
// call on the device by a small kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dip/lanczos.h"
#include "dip/lanczos_checks.h"

namespace dip {
namespace {

using namespace dip::lanczos;

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t max_blocks = 65535;  // grid-stride loops cover the rest
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// weight[o, j] = window_weight(o, j) for one axis of length n.
template <typename acc_t>
__global__ void window_table_kernel(acc_t* weight, int64_t n, int64_t n_out, int64_t width, int64_t factor,
                                    int64_t support, double inv_sum) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n_out * width;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t o = idx / width, j = idx % width;
    weight[idx] = static_cast<acc_t>(window_weight(o, j, n, factor, support, inv_sum));
  }
}

template <typename acc_t>
at::Tensor window_table(int64_t n, int64_t factor, int64_t support, const at::TensorOptions& options,
                        cudaStream_t stream) {
  const int64_t n_out = n / factor, width = window_width(n, factor, support);
  at::Tensor weight = at::empty({n_out, width}, options);
  window_table_kernel<acc_t><<<blocks_for(n_out * width), kThreads, 0, stream>>>(
      weight.data_ptr<acc_t>(), n, n_out, width, factor, support, 1.0 / tap_sum(factor, support));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return weight;
}

// Forward, pass 1: tmp[p, oy, i] = Σ_j V[oy, j] · x[p, start(oy) + j, i].
template <typename scalar_t, typename acc_t>
__global__ void rows_forward_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ tmp,
                                    const acc_t* __restrict__ weight, int64_t planes, int64_t h, int64_t w,
                                    int64_t factor, int64_t support) {
  const int64_t ho = h / factor, width = window_width(h, factor, support);
  const int64_t total = planes * ho * w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = idx % w, oy = (idx / w) % ho, p = idx / (w * ho);
    const scalar_t* src = x + (p * h + window_start(oy, h, factor, support)) * w + i;
    const acc_t* wv = weight + oy * width;
    acc_t acc = 0;
    for (int64_t j = 0; j < width; ++j) acc += wv[j] * static_cast<acc_t>(src[j * w]);
    tmp[idx] = acc;
  }
}

// Forward, pass 2: y[p, oy, ox] = Σ_j H[ox, j] · tmp[p, oy, start(ox) + j].
template <typename scalar_t, typename acc_t>
__global__ void cols_forward_kernel(const acc_t* __restrict__ tmp, scalar_t* __restrict__ y,
                                    const acc_t* __restrict__ weight, int64_t rows_total, int64_t w,
                                    int64_t factor, int64_t support) {
  const int64_t wo = w / factor, width = window_width(w, factor, support);
  const int64_t total = rows_total * wo;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t ox = idx % wo, r = idx / wo;
    const acc_t* src = tmp + r * w + window_start(ox, w, factor, support);
    const acc_t* wh = weight + ox * width;
    acc_t acc = 0;
    for (int64_t j = 0; j < width; ++j) acc += wh[j] * src[j];
    y[idx] = static_cast<scalar_t>(acc);
  }
}

// Backward, pass 1 (transposed horizontal filter, as a gather):
// tmp[p, oy, i] = Σ_{ox covering i} H[ox, i − start(ox)] · g[p, oy, ox].
template <typename scalar_t, typename acc_t>
__global__ void cols_backward_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ tmp,
                                     const acc_t* __restrict__ weight, int64_t rows_total, int64_t w,
                                     int64_t factor, int64_t support) {
  const int64_t wo = w / factor, width = window_width(w, factor, support);
  const int64_t total = rows_total * w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = idx % w, r = idx / w;
    int64_t lo, hi;
    covering_outputs(i, w, wo, factor, support, &lo, &hi);
    const scalar_t* src = g + r * wo;
    acc_t acc = 0;
    for (int64_t ox = lo; ox <= hi; ++ox) {
      acc += weight[ox * width + (i - window_start(ox, w, factor, support))] * static_cast<acc_t>(src[ox]);
    }
    tmp[idx] = acc;
  }
}

// Backward, pass 2 (transposed vertical filter, as a gather):
// gx[p, iy, i] = Σ_{oy covering iy} V[oy, iy − start(oy)] · tmp[p, oy, i].
template <typename scalar_t, typename acc_t>
__global__ void rows_backward_kernel(const acc_t* __restrict__ tmp, scalar_t* __restrict__ gx,
                                     const acc_t* __restrict__ weight, int64_t planes, int64_t h, int64_t w,
                                     int64_t factor, int64_t support) {
  const int64_t ho = h / factor, width = window_width(h, factor, support);
  const int64_t total = planes * h * w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = idx % w, iy = (idx / w) % h, p = idx / (w * h);
    int64_t lo, hi;
    covering_outputs(iy, h, ho, factor, support, &lo, &hi);
    const acc_t* src = tmp + p * ho * w + i;
    acc_t acc = 0;
    for (int64_t oy = lo; oy <= hi; ++oy) {
      acc += weight[oy * width + (iy - window_start(oy, h, factor, support))] * src[oy * w];
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

at::Tensor lanczos_downsample_cuda(const at::Tensor& x, int64_t factor, int64_t support) {
  check_forward(x, factor, support);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t planes = n * c, ho = h / factor, wo = w / factor;
  at::Tensor y = at::empty({n, c, ho, wo}, x.options());
  if (y.numel() == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lanczos_downsample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor v = window_table<acc_t>(h, factor, support, acc_options, stream);
    const at::Tensor hw = window_table<acc_t>(w, factor, support, acc_options, stream);
    at::Tensor tmp = at::empty({planes, ho, w}, acc_options);
    rows_forward_kernel<scalar_t, acc_t><<<blocks_for(tmp.numel()), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), tmp.data_ptr<acc_t>(), v.data_ptr<acc_t>(), planes, h, w, factor, support);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cols_forward_kernel<scalar_t, acc_t><<<blocks_for(y.numel()), kThreads, 0, stream>>>(
        tmp.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), hw.data_ptr<acc_t>(), planes * ho, w, factor, support);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor lanczos_downsample_backward_cuda(const at::Tensor& grad_output, int64_t factor, int64_t support,
                                            int64_t height, int64_t width) {
  check_backward(grad_output, factor, support, height, width);
  TORCH_INTERNAL_ASSERT(grad_output.device().is_cuda());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor gc = grad_output.contiguous();
  const int64_t n = gc.size(0), c = gc.size(1), planes = n * c, ho = height / factor;
  at::Tensor gx = at::empty({n, c, height, width}, gc.options());
  if (gx.numel() == 0) return gx;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gc.scalar_type(), "lanczos_downsample_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto acc_options = gc.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
        const at::Tensor v = window_table<acc_t>(height, factor, support, acc_options, stream);
        const at::Tensor hw = window_table<acc_t>(width, factor, support, acc_options, stream);
        at::Tensor tmp = at::empty({planes, ho, width}, acc_options);
        cols_backward_kernel<scalar_t, acc_t><<<blocks_for(tmp.numel()), kThreads, 0, stream>>>(
            gc.data_ptr<scalar_t>(), tmp.data_ptr<acc_t>(), hw.data_ptr<acc_t>(), planes * ho, width, factor,
            support);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        rows_backward_kernel<scalar_t, acc_t><<<blocks_for(gx.numel()), kThreads, 0, stream>>>(
            tmp.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), v.data_ptr<acc_t>(), planes, height, width, factor,
            support);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip, CUDA, m) {
  m.impl("lanczos_downsample", &lanczos_downsample_cuda);
  m.impl("_lanczos_downsample_backward", &lanczos_downsample_backward_cuda);
}

}  // namespace dip
