"""The strided convolutional stack that reads a slice down to a 4 x 4 map: the factor oracle's and the MIG/DCI
protocol's code encoder share it."""
from __future__ import annotations

import torch.nn as nn


def strided_convs(image_size: int, width: int, channels: int = 1) -> tuple[list[nn.Module], int]:
    """4 x 4 convolutions of stride 2, each with batch norm and LeakyReLU(0.2), from ``image_size`` down to 4 x 4;
    widths width, 2 width, ... up to 8 width. Returns the layers and the channels of the last one."""
    layers, c, size, level = [], channels, image_size, 0
    while size > 4:
        out = min(width * 2 ** level, 8 * width)
        layers += [nn.Conv2d(c, out, 4, 2, 1), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
        c, size, level = out, size // 2, level + 1
    return layers, c
