"""Operators that have a fused C++/CUDA kernel and a pure-PyTorch reference."""
from dip.ops.lanczos import (
    lanczos_downsample,
    lanczos_downsample_adjoint,
    lanczos_downsample_reference,
    lanczos_taps,
)

__all__ = ["lanczos_downsample", "lanczos_downsample_adjoint", "lanczos_downsample_reference", "lanczos_taps"]
