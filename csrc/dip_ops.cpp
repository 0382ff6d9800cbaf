// Operator schemas of the dip library (one TORCH_LIBRARY block) and the
// pybind11 module dip._C, whose import loads the kernels registered in the
// other translation units of this extension.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

TORCH_LIBRARY(dip, m) {

  // Lanczos downsampling by an integer factor (2..32), support 2 or 3, replicate
  // padding folded in: N×C×H×W -> N×C×(H/factor)×(W/factor). See dip/lanczos.h.
  m.def("lanczos_downsample(Tensor x, int factor, int support=2) -> Tensor");
  // Its adjoint applied to grad_output, giving the gradient of an input of
  // input_height × input_width (not recoverable from the output size alone).
  m.def(
      "_lanczos_downsample_backward(Tensor grad_output, int factor, int support, SymInt input_height, "
      "SymInt input_width) -> Tensor");

  // Bilinear x2 upsampling, align_corners=False (channels_last output), and its
  // adjoint for an input of height x width. See dip/upsample.h.
  m.def("upsample_bilinear2x(Tensor x) -> Tensor");
  m.def("_upsample_bilinear2x_backward(Tensor grad_output, SymInt height, SymInt width) -> Tensor");

  // The decoder's merge: BatchNorm (no activation) of cat([a, b], dim=1),
  // written as one channels_last tensor; returns it and the statistics used.
  // With groups G, a and b hold G members' channels each and are concatenated
  // member by member: [a_1, b_1, ..., a_G, b_G].
  m.def(
      "merge_bn(Tensor a, Tensor b, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float eps, int groups=1) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "merge_bn_backward(Tensor grad_out, Tensor a, Tensor b, Tensor mean, Tensor var, Tensor bn_weight, "
      "bool training, float eps, int groups=1) -> (Tensor grad_a, Tensor grad_b, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");

  // Fused conv block: reflection (or zero) pad -> k x k conv -> BatchNorm -> LeakyReLU.
  // Returns the block output, the conv output y and the statistics used
  // (batch mean / biased variance in training mode, the running ones in eval).
  m.def(
      "conv_block(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, int stride, int padding, bool reflect, "
      "float eps, float slope) -> (Tensor out, Tensor y, Tensor mean, Tensor var)");
  m.def(
      "conv_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor y, Tensor mean, Tensor var, "
      "Tensor bn_weight, Tensor bn_bias, bool training, int stride, int padding, bool reflect, float eps, "
      "float slope, bool need_grad_input) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef DIP_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["openmp_threads"] = at::get_num_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dip compiled operators (registered under torch.ops.dip)";
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA kernels, threads");
}
