// Argument checks of the Lanczos downsampling operators, shared by the CPU and
// CUDA kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dip/lanczos.h"

namespace dip {
namespace lanczos {

inline void check_factor_support(int64_t factor, int64_t support) {
  TORCH_CHECK(factor >= kMinFactor && factor <= kMaxFactor,
              "lanczos_downsample: factor must be an integer from ", kMinFactor, " to ", kMaxFactor,
              ", got ", factor);
  TORCH_CHECK(support == 2 || support == 3,
              "lanczos_downsample: support must be 2 (Lanczos2) or 3 (Lanczos3), got ", support);
}

inline void check_forward(const at::Tensor& x, int64_t factor, int64_t support) {
  check_factor_support(factor, support);
  TORCH_CHECK(x.dim() == 4, "lanczos_downsample: expected an N×C×H×W tensor, got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lanczos_downsample: expected a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= factor && x.size(3) >= factor, "lanczos_downsample: image of ", x.size(2), "×",
              x.size(3), " is smaller than the factor ", factor, " (the output would be empty)");
}

inline void check_backward(const at::Tensor& grad_output, int64_t factor, int64_t support, int64_t height,
                           int64_t width) {
  check_factor_support(factor, support);
  TORCH_CHECK(grad_output.dim() == 4, "_lanczos_downsample_backward: expected an N×C×H×W gradient, got ",
              grad_output.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()),
              "_lanczos_downsample_backward: expected a floating-point gradient, got ", grad_output.scalar_type());
  TORCH_CHECK(height >= factor && width >= factor, "_lanczos_downsample_backward: input of ", height, "×", width,
              " is smaller than the factor ", factor);
  TORCH_CHECK(grad_output.size(2) == height / factor && grad_output.size(3) == width / factor,
              "_lanczos_downsample_backward: gradient of ", grad_output.size(2), "×", grad_output.size(3),
              " does not match an input of ", height, "×", width, " downsampled by ", factor);
}

// The CPU kernels take float32 and float64 only; the CUDA kernels also take
// float16 and bfloat16 (computing in float), so only the CPU kernels call this.
inline void check_cpu_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 and float64 tensors (float16 and bfloat16 only on CUDA), got ",
              t.scalar_type());
}

}  // namespace lanczos
}  // namespace dip
