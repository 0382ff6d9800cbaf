// The rule of training-mode BatchNorm shared by the operators that normalise
// with batch statistics (dip::conv_block, dip::merge_bn and their backwards,
// CPU and CUDA): the statistics need pixels, and more than one value per
// channel.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace dip {

// values: the number of values per channel (N x H x W of the normalised tensor),
// sizes: that tensor's shape (for the message). No values at all is refused
// with a RuntimeError (as before); exactly one with a ValueError and the words of
// torch.nn.functional.batch_norm, whose check this is: with one value the
// variance is 0 and the output would be the BatchNorm bias, whatever the input.
inline void check_batch_stats(const char* op, int64_t values, c10::IntArrayRef sizes) {
  TORCH_CHECK(values > 0, op, ": training mode (batch statistics) needs at least one pixel, got ", sizes,
              "; an empty batch is only defined in eval mode (training=False with running stats)");
  TORCH_CHECK_VALUE(values != 1, op, ": Expected more than 1 value per channel when training, got input size ",
                    sizes);
}

}  // namespace dip
