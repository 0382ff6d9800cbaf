"""Networks: the skip-hourglass generator and its blocks."""
from dip.nn.blocks import ConvBlock, make_activation
from dip.nn.hourglass import PRESETS, Hourglass, HourglassConfig, build_network, preset

__all__ = ["ConvBlock", "Hourglass", "HourglassConfig", "PRESETS", "build_network", "make_activation", "preset"]
