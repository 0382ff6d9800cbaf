"""Networks: the skip-hourglass generator and its blocks."""
from dip.nn.blocks import (
    PURE_PATH,
    ConvBlock,
    FusedConvBlock,
    active_path,
    fusable,
    make_activation,
    make_conv_block,
    network_path,
)
from dip.nn.hourglass import PRESETS, Hourglass, HourglassConfig, build_network, preset

__all__ = [
    "ConvBlock",
    "FusedConvBlock",
    "PURE_PATH",
    "active_path",
    "fusable",
    "make_conv_block",
    "Hourglass",
    "HourglassConfig",
    "PRESETS",
    "build_network",
    "make_activation",
    "network_path",
    "preset",
]
