"""Operators that have a fused C++/CUDA kernel and a pure-PyTorch reference."""
from dip.ops.lanczos import (
    lanczos_downsample,
    lanczos_downsample_adjoint,
    lanczos_downsample_reference,
    lanczos_taps,
)
from dip.ops.merge_bn import merge_bn, merge_bn_reference
from dip.ops.upsample import UpsampleBilinear2x, upsample_bilinear2x, upsample_bilinear2x_reference

__all__ = ["lanczos_downsample", "lanczos_downsample_adjoint", "lanczos_downsample_reference", "lanczos_taps",
           "merge_bn", "merge_bn_reference", "UpsampleBilinear2x", "upsample_bilinear2x", "upsample_bilinear2x_reference"]
