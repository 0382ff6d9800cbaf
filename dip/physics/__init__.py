"""Degradation operators ``A``: what turned the true image into the observed one."""
from dip.physics.operators import Custom, Denoise, Downsample, Inpaint, Operator

__all__ = ["Operator", "Denoise", "Downsample", "Inpaint", "Custom"]
