"""Reconstructors: see (G(z), G(z + shift)) and predict which direction moved (logits over K) and by how much.

LeNet (width 2) and ResNet-18, both with a two-channel input (the image pair), written here because
torchvision cannot be imported on this CPU build.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self, directions_count: int, width: int = 2, channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2 * channels, 3 * width, 5), nn.BatchNorm2d(3 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3 * width, 8 * width, 5), nn.BatchNorm2d(8 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8 * width, 60 * width, 5), nn.BatchNorm2d(60 * width), nn.ReLU(),
        )
        self.logits = nn.Sequential(nn.Linear(60 * width, 42 * width), nn.BatchNorm1d(42 * width), nn.ReLU(),
                                    nn.Linear(42 * width, directions_count))
        self.shift = nn.Sequential(nn.Linear(60 * width, 42 * width), nn.BatchNorm1d(42 * width), nn.ReLU(),
                                   nn.Linear(42 * width, 1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        h = self.features(torch.cat([x1, x2], dim=1)).mean(dim=(-1, -2))
        return self.logits(h), self.shift(h).squeeze(1)


class BasicBlock(nn.Module):
    def __init__(self, channel_in: int, channel_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channel_in, channel_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channel_out)
        self.conv2 = nn.Conv2d(channel_out, channel_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channel_out)
        self.down, self.stride = None, stride
        if stride != 1 or channel_in != channel_out:
            # The shortcut is ResNet's 1x1 convolution of stride 2, written as every second pixel and then a 1x1
            # convolution of stride 1 (the same numbers, the same weights). oneDNN's backward-weights kernel for a
            # strided 1x1 convolution on channels_last input with fewer input channels than its block (8 on AVX2,
            # 16 on AVX-512) writes past its workspace: a segfault or wrong gradients (uxlfoundation/oneDNN#6035),
            # met here with --reconstructor-width 4 on an AVX2 CPU.
            self.down = nn.Sequential(nn.Conv2d(channel_in, channel_out, 1, 1, bias=False),
                                      nn.BatchNorm2d(channel_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x[:, :, ::self.stride, ::self.stride])))


class ResNet18(nn.Module):
    """ResNet-18 (He et al.) with a two-channel first conv and two heads. Unlike the study's code, the second
    channel really is the shifted image (the original overwrote it with the first)."""

    def __init__(self, directions_count: int, channels: int = 1, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2 * channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, c = [], width
        for i, out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c, out, stride), BasicBlock(out, out)]
            c = out
        self.layers = nn.Sequential(*layers)
        self.logits = nn.Linear(c, directions_count)
        self.shift = nn.Linear(c, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        h = self.layers(self.stem(torch.cat([x1, x2], dim=1))).mean(dim=(-1, -2))
        return self.logits(h), self.shift(h).squeeze(1)


def make_reconstructor(kind: str, directions_count: int, width: int | None = None, channels: int = 1) -> nn.Module:
    """``channels`` per image: 1 for slices, 3 for a volume's mid-planes (both images stacked: 2 x channels)."""
    if kind == "lenet":
        return LeNet(directions_count, width=width or 2, channels=channels)
    if kind == "resnet":
        return ResNet18(directions_count, channels=channels, width=width or 64)
    raise ValueError(f"--reconstructor: {kind!r} is not lenet or resnet")
