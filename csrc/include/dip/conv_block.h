// Shared pieces of the fused conv block (reflection pad -> conv -> BatchNorm
// -> LeakyReLU): index math usable from CPU and CUDA code, and the
// device-agnostic host steps (argument checks, the convolution itself).
//
// Layout: every activation the kernels write is channels_last (NHWC in
// memory), which is both the fastest layout of the vendor convolutions and
// the one where per-channel BatchNorm is a contiguous inner loop.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "dip/batch_stats.h"

#include <algorithm>
#include <utility>
#include <vector>

#ifdef __CUDACC__
#define DIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DIP_HOST_DEVICE inline
#endif

namespace dip {

// Source index of padded position i (already shifted by -pad) under
// reflection padding of an axis of length n (requires pad < n).
DIP_HOST_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

// Padded positions (at most 3) whose reflection lands on source index s of
// an axis of length n padded by pad on both sides; returns how many.
DIP_HOST_DEVICE int reflect_sources(int64_t s, int64_t n, int64_t pad, int64_t* out) {
  int k = 0;
  out[k++] = s + pad;
  if (s >= 1 && s <= pad) out[k++] = pad - s;
  if (s >= n - 1 - pad && s <= n - 2) out[k++] = pad + 2 * (n - 1) - s;
  return k;
}

// Canonical channels_last tensor with the shape of t (strides as at::empty gives).
inline at::Tensor empty_cl(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
}

// t itself when it already has canonical channels_last strides, else a copy that has.
inline at::Tensor canonical_cl(const at::Tensor& t) {
  auto ref = empty_cl(t.sizes(), t.options());
  if (t.strides() == ref.strides()) return t;
  ref.copy_(t);
  return ref;
}

// t itself when it is a canonical channels_last tensor of dtype, else a copy
// that is (the layout change and the conversion in one pass).
inline at::Tensor canonical_cl(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return canonical_cl(t);
  auto out = empty_cl(t.sizes(), t.options().dtype(dtype));
  out.copy_(t);
  return out;
}

// True when two elements of a tensor with t's sizes and strides may share
// memory (an expand()ed tensor, say): sorted by stride, each dimension's
// stride must pass the last element the smaller ones reach.
inline bool may_overlap(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 1;  // one past the largest offset of the dimensions so far
  for (const auto& [stride, size] : dims) {
    if (stride < reach) return true;
    reach += stride * (size - 1);
  }
  return false;
}

// t itself when it has ref's strides, else a copy of t with ref's strides
// (gradients come back in their parameter's layout); a contiguous t when
// ref's strides overlap, since a gradient cannot be written into those.
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides() && !may_overlap(t)) return t;
  if (may_overlap(ref)) return t.contiguous();
  auto out = at::empty_strided(ref.sizes(), ref.strides(), t.options());
  out.copy_(t);
  return out;
}

// The ATen calls inside the kernels (convolution, mm, addmm) must run in the
// dtypes the kernel hands them: the operator has no autocast rule, so under
// torch.autocast the autocast keys are still active when its kernels run, and
// those calls would otherwise return bfloat16 or half tensors that the
// element-wise kernels do not take. Hold one of these around them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

struct ConvBlockArgs {
  int64_t stride;
  int64_t padding;
  bool reflect;
};

// The convolution's groups, implied by the shapes as in at::convolution: the
// weight is Cout x (Cin / groups) x k x k. Grouped blocks are the members of a
// seed ensemble side by side (dip.nn.Hourglass(..., members=K)); the
// per-channel BatchNorm and activation do not depend on the grouping.
inline int64_t conv_groups(const at::Tensor& xin, const at::Tensor& weight) {
  return xin.size(1) / weight.size(1);
}

// Per-channel parameter or statistic `what` of the block: a 1-D tensor of c
// elements on the input's device (dtype checked by the caller where it matters).
inline void check_channel_vector(const char* op, const char* what, const at::Tensor& t, int64_t c,
                                 const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", what, " must be a 1-D tensor of ", c,
              " elements (one per output channel), got shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but the input is on ", x.device());
}

// The checks of x, weight and the block's options that the forward and the
// backward share (shapes, dtypes, devices): after them every size used by the
// kernels is positive except the batch, and no division by a channel count
// can be by zero.
inline void check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const ConvBlockArgs& a) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be N x C x H x W, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be Cout x (Cin / groups) x k x k, got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": the weight is on ", weight.device(), " but the input is on ",
              x.device());
  TORCH_CHECK(x.size(1) > 0, op, ": the input has no channels (shape ", x.sizes(), ")");
  TORCH_CHECK(weight.size(0) > 0, op, ": the weight has no output channels (shape ", weight.sizes(), ")");
  // x.size(1) > 0 and a multiple of weight.size(1): groups = x.size(1) / weight.size(1) >= 1.
  TORCH_CHECK(weight.size(1) > 0 && x.size(1) % weight.size(1) == 0 &&
                  weight.size(0) % conv_groups(x, weight) == 0 && weight.size(2) == weight.size(3),
              op, ": weight must be Cout x (Cin / groups) x k x k with groups dividing Cin = ", x.size(1),
              " and Cout, got ", weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1, op, ": kernel size must be odd, got ", weight.size(2));
  TORCH_CHECK(a.stride == 1 || a.stride == 2, op, ": stride must be 1 or 2, got ", a.stride);
  TORCH_CHECK(a.padding >= 0 && 2 * a.padding == weight.size(2) - 1, op, ": padding must be (k - 1) / 2 = ",
              (weight.size(2) - 1) / 2, ", got ", a.padding);
  const auto dtype = x.scalar_type(), conv_dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": only float32 and float64 inputs are supported, got ", dtype);
  TORCH_CHECK(conv_dtype == dtype || (conv_dtype == at::kBFloat16 && dtype == at::kFloat), op,
              ": the weight must have the input's dtype ", dtype,
              " (or be bfloat16 with a float32 input, for a bf16 convolution), got ", conv_dtype);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": the input's spatial size must be positive, got ", x.sizes());
  if (a.reflect) {
    TORCH_CHECK(a.padding < x.size(2) && a.padding < x.size(3), op, ": reflection padding ", a.padding,
                " must be smaller than the input's spatial size ", x.size(2), " x ", x.size(3));
  }
  TORCH_CHECK(x.size(2) + 2 * a.padding >= weight.size(2) && x.size(3) + 2 * a.padding >= weight.size(3), op,
              ": input ", x.sizes(), " is smaller than the kernel");
}

// The shape of the block's output (and of the conv output y) for x and weight.
inline std::vector<int64_t> block_output_size(const at::Tensor& x, const at::Tensor& weight,
                                              const ConvBlockArgs& a) {
  const int64_t k = weight.size(2);
  return {x.size(0), weight.size(0), (x.size(2) + 2 * a.padding - k) / a.stride + 1,
          (x.size(3) + 2 * a.padding - k) / a.stride + 1};
}

// User-facing checks shared by the CPU and CUDA forward kernels.
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training,
                               const ConvBlockArgs& a) {
  constexpr const char* op = "conv_block";
  check_conv_args(op, x, weight, a);
  const auto dtype = x.scalar_type(), conv_dtype = weight.scalar_type();
  const int64_t c = weight.size(0);
  if (bias.has_value()) {
    check_channel_vector(op, "the conv bias", *bias, c, x);
    TORCH_CHECK(bias->scalar_type() == conv_dtype, "conv_block: the conv bias must have the weight's dtype ",
                conv_dtype, ", got ", bias->scalar_type());
  }
  check_channel_vector(op, "the BatchNorm weight", bn_weight, c, x);
  check_channel_vector(op, "the BatchNorm bias", bn_bias, c, x);
  TORCH_CHECK(bn_weight.scalar_type() == dtype && bn_bias.scalar_type() == dtype,
              "conv_block: the BatchNorm weight and bias must have the input's dtype ", dtype, ", got ",
              bn_weight.scalar_type(), " and ", bn_bias.scalar_type());
  if (training) {
    // As in at::native_batch_norm: the batch statistics of no pixels are undefined.
    TORCH_CHECK(x.size(0) > 0, "conv_block: training mode (batch statistics) needs a non-empty batch, got input ",
                x.sizes(), "; an empty batch is only defined in eval mode (training=False with running stats)");
    const auto size = block_output_size(x, weight, a);
    check_batch_stats(op, size[0] * size[2] * size[3], size);
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "conv_block: eval mode needs running_mean and running_var");
    check_channel_vector(op, "running_mean", *running_mean, c, x);
    check_channel_vector(op, "running_var", *running_var, c, x);
    TORCH_CHECK(at::isFloatingType(running_mean->scalar_type()) && at::isFloatingType(running_var->scalar_type()),
                "conv_block: the running stats must be floating point, got ", running_mean->scalar_type(), " and ",
                running_var->scalar_type());
  }
}

// User-facing checks shared by the CPU and CUDA backward kernels: x and the
// options as in the forward (and in training mode its batch-statistics rule), y of the forward's output shape in the weight's
// dtype, grad_out of that shape, and the statistics and BatchNorm parameters
// of one element per output channel in the input's dtype.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool training,
                                const ConvBlockArgs& a) {
  constexpr const char* op = "conv_block_backward";
  check_conv_args(op, x, weight, a);
  const auto size = block_output_size(x, weight, a);
  TORCH_CHECK(y.sizes() == at::IntArrayRef(size), "conv_block_backward: y must have the block's output shape ",
              at::IntArrayRef(size), " for input ", x.sizes(), " and weight ", weight.sizes(), ", got ", y.sizes());
  // The gradient of batch statistics the forward refuses to compute (no pixels, or one per channel).
  if (training) check_batch_stats(op, size[0] * size[2] * size[3], size);
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "conv_block_backward: grad_out must have the output's shape ",
              y.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(y.scalar_type() == weight.scalar_type(), "conv_block_backward: y must have the weight's dtype ",
              weight.scalar_type(), ", got ", y.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "conv_block_backward: grad_out must be floating point, got ",
              grad_out.scalar_type());
  TORCH_CHECK(y.device() == x.device() && grad_out.device() == x.device(),
              "conv_block_backward: y and grad_out must be on the input's device ", x.device());
  const int64_t c = weight.size(0);
  const at::Tensor* vectors[] = {&mean, &var, &bn_weight, &bn_bias};
  const char* names[] = {"mean", "var", "the BatchNorm weight", "the BatchNorm bias"};
  for (int i = 0; i < 4; ++i) {
    check_channel_vector(op, names[i], *vectors[i], c, x);
    TORCH_CHECK(vectors[i]->scalar_type() == x.scalar_type(), "conv_block_backward: ", names[i],
                " must have the input's dtype ", x.scalar_type(), ", got ", vectors[i]->scalar_type());
  }
}

// A 1x1 stride-1 ungrouped convolution, which runs as one GEMM.
inline bool is_pointwise(const at::Tensor& xin, const at::Tensor& weight, int64_t stride, int64_t zero_pad) {
  return weight.size(2) == 1 && stride == 1 && zero_pad == 0 && conv_groups(xin, weight) == 1;
}

// Rows x channels view of a canonical channels_last tensor.
inline at::Tensor rows(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}

// Convolution of xin (channels_last; already reflection-padded, or zero-padded
// by the convolution itself through zero_pad). A 1x1 stride-1 convolution is
// a plain GEMM on the rows x channels view, which beats the vendor kernel.
inline at::Tensor conv_forward(const at::Tensor& xin, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               int64_t stride, int64_t zero_pad) {
  if (is_pointwise(xin, weight, stride, zero_pad)) {
    auto w2 = weight.reshape({weight.size(0), weight.size(1)});
    auto x2 = rows(xin);
    auto y2 = bias.has_value() ? at::addmm(*bias, x2, w2.t()) : at::mm(x2, w2.t());
    return y2.view({xin.size(0), xin.size(2), xin.size(3), weight.size(0)}).permute({0, 3, 1, 2});
  }
  return canonical_cl(at::convolution(xin, weight, bias, {stride, stride}, {zero_pad, zero_pad}, {1, 1}, false,
                                      {0, 0}, conv_groups(xin, weight)));
}

// Gradients of conv_forward with respect to xin (when need_input) and weight.
inline std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_y, const at::Tensor& xin,
                                                        const at::Tensor& weight, int64_t stride, int64_t zero_pad,
                                                        bool need_input) {
  if (is_pointwise(xin, weight, stride, zero_pad)) {
    auto w2 = weight.reshape({weight.size(0), weight.size(1)});
    auto g2 = rows(grad_y);
    at::Tensor gx;
    if (need_input) {
      gx = at::mm(g2, w2).view({xin.size(0), xin.size(2), xin.size(3), xin.size(1)}).permute({0, 3, 1, 2});
    }
    // A 1x1 weight's strides differ between layouts only on its size-1
    // dimensions, so the GEMM result can take the weight's strides as is.
    auto gw = at::mm(g2.t(), rows(xin));
    const bool dense = weight.is_contiguous() || weight.is_contiguous(at::MemoryFormat::ChannelsLast);
    gw = dense ? gw.as_strided(weight.sizes(), weight.strides()) : like(gw.view(weight.sizes()), weight);
    return {gx, gw};
  }
  auto res = at::convolution_backward(grad_y, xin, weight, c10::nullopt, {stride, stride}, {zero_pad, zero_pad},
                                      {1, 1}, false, {0, 0}, conv_groups(xin, weight), {need_input, true, false});
  auto gx = need_input ? canonical_cl(std::get<0>(res)) : at::Tensor();
  return {gx, like(std::get<1>(res), weight)};
}

// The block's convolution, given the device's reflection-pad kernel
// reflect_pad(x, pad, dtype): the input is reflection-padded here, or
// zero-padded by the convolution itself. The convolution runs in the weight's
// dtype (the input is converted on the way, in the padding copy when there is
// one), and so does its output.
template <typename ReflectPad>
at::Tensor block_conv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t stride, int64_t padding, bool reflect, ReflectPad reflect_pad) {
  const NoAutocast no_autocast;
  const auto conv_dtype = weight.scalar_type();
  const auto xin = reflect && padding > 0 ? reflect_pad(x, padding, conv_dtype) : canonical_cl(x, conv_dtype);
  return conv_forward(xin, weight, bias, stride, reflect ? 0 : padding);
}

// Gradients of block_conv_forward with respect to x (an empty tensor unless
// need_grad_input; x's dtype) and weight (grad_y and the weight share a dtype),
// given the device's pad kernel and its adjoint reflect_unpad(g, pad, sizes,
// dtype). The padded input is recomputed rather than saved by the forward.
template <typename ReflectPad, typename ReflectUnpad>
std::tuple<at::Tensor, at::Tensor> block_conv_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                       const at::Tensor& weight, int64_t stride, int64_t padding,
                                                       bool reflect, bool need_grad_input, ReflectPad reflect_pad,
                                                       ReflectUnpad reflect_unpad) {
  const NoAutocast no_autocast;
  const bool pad_here = reflect && padding > 0;
  const auto conv_dtype = weight.scalar_type();
  const auto xin = pad_here ? reflect_pad(x, padding, conv_dtype) : canonical_cl(x, conv_dtype);
  auto [grad_xin, grad_weight] = conv_backward(grad_y, xin, weight, stride, reflect ? 0 : padding, need_grad_input);
  if (!need_grad_input) {
    return {at::empty({0}, x.options()), grad_weight};
  }
  const auto dtype = x.scalar_type();
  return {pad_here ? reflect_unpad(grad_xin, padding, x.sizes(), dtype) : canonical_cl(grad_xin, dtype), grad_weight};
}

}  // namespace dip
