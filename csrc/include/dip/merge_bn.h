// Argument checks of the decoder's merge (dip::merge_bn and its backward),
// in one place for every kernel of the operator (the CPU one in
// csrc/cpu/merge_bn_kernel.cpp; a device kernel must call the same checks).
//
// Empty tensors: a batch or spatial size of 0, or a part (a or b) with no
// channels, is a well-defined merge and gives empty results, except in
// training mode, where the batch statistics of no pixels are undefined (as in
// at::native_batch_norm) and the forward and backward refuse it, as they
// refuse one value per channel (see dip/batch_stats.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dip/batch_stats.h"

namespace dip {
namespace merge {

// groups must split both inputs' channels into equal member blocks.
inline void check_groups(const char* op, int64_t ca, int64_t cb, int64_t groups) {
  TORCH_CHECK(groups >= 1 && ca % groups == 0 && cb % groups == 0, op, ": groups (", groups,
              ") must be positive and divide both inputs' channels, ", ca, " and ", cb);
}

// a and b: N x Ca x H x W and N x Cb x H x W, float32 or float64, one dtype and device.
inline void check_parts(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t groups) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, op, ": inputs must be N x C x H x W, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), op,
              ": inputs must agree in batch and spatial size, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": both inputs must have one dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), op, ": both inputs must be on one device, got ", a.device(), " and ",
              b.device());
  check_groups(op, a.size(1), b.size(1), groups);
}

// A per-channel vector: 1-D, c elements, with a's dtype (when same_dtype) and device.
inline void check_vector(const char* op, const char* what, const at::Tensor& t, int64_t c, const at::Tensor& a,
                         bool same_dtype = true) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", what, " must be a 1-D tensor of ", c,
              " elements (one per output channel), got shape ", t.sizes());
  TORCH_CHECK(!same_dtype || t.scalar_type() == a.scalar_type(), op, ": ", what, " must have the inputs' dtype ",
              a.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(same_dtype || at::isFloatingType(t.scalar_type()), op, ": ", what, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == a.device(), op, ": ", what, " is on ", t.device(), " but the inputs are on ",
              a.device());
}

inline void check_forward(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gamma, const at::Tensor& beta,
                          const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                          bool training, int64_t groups) {
  constexpr const char* op = "merge_bn";
  check_parts(op, a, b, groups);
  const int64_t c = a.size(1) + b.size(1);
  check_vector(op, "the BatchNorm weight", gamma, c, a);
  check_vector(op, "the BatchNorm bias", beta, c, a);
  if (training) {
    check_batch_stats(op, a.size(0) * a.size(2) * a.size(3), {a.size(0), c, a.size(2), a.size(3)});
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "merge_bn: eval mode needs running_mean and "
                "running_var of ", c, " elements");
    check_vector(op, "running_mean", *running_mean, c, a, /*same_dtype=*/false);
    check_vector(op, "running_var", *running_var, c, a, /*same_dtype=*/false);
  }
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma, bool training,
                           int64_t groups) {
  constexpr const char* op = "merge_bn_backward";
  check_parts(op, a, b, groups);
  const int64_t c = a.size(1) + b.size(1);
  // The gradient of batch statistics the forward refuses to compute (no pixels, or one per channel).
  if (training) check_batch_stats(op, a.size(0) * a.size(2) * a.size(3), {a.size(0), c, a.size(2), a.size(3)});
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(1) == c && grad_out.size(0) == a.size(0) &&
                  grad_out.size(2) == a.size(2) && grad_out.size(3) == a.size(3),
              "merge_bn_backward: grad_out must be N x ", c, " x H x W like the output, got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == a.scalar_type() && grad_out.device() == a.device(),
              "merge_bn_backward: grad_out must have the inputs' dtype ", a.scalar_type(), " and device ", a.device(),
              ", got ", grad_out.scalar_type(), " on ", grad_out.device());
  check_vector(op, "mean", mean, c, a);
  check_vector(op, "var", var, c, a);
  check_vector(op, "the BatchNorm weight", gamma, c, a);
}

}  // namespace merge
}  // namespace dip
