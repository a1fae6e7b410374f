"""DCGAN generator and discriminator (Radford et al.), shaped as in Schön et al. 2022 for any 2^n image size."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


def _levels(image_size: int) -> int:
    """Upsampling steps from 4x4 to the image size."""
    levels = int(round(math.log2(image_size))) - 2
    if image_size != 2 ** (levels + 2) or levels < 1:
        raise ValueError(f"the DCGAN needs an image size that is a power of two >= 8, got {image_size}")
    return levels


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02) and zero shifts."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (B, latent_dim) -> image (B, channels, S, S) in [-1, 1]. At 128 px with ngf 128: the study's shapes."""

    def __init__(self, latent_dim: int = 32, image_size: int = 64, ngf: int = 64, channels: int = 1):
        super().__init__()
        self.latent_dim, self.image_size = latent_dim, image_size
        levels = _levels(image_size)
        width = ngf * 2 ** (levels - 1)
        layers = [nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], self.latent_dim, 1, 1))

    def first_layer(self, z: torch.Tensor) -> torch.Tensor:
        """The first linear map of z (before any nonlinearity), flattened; SeFa factorises it."""
        return self.main[0](z.reshape(z.shape[0], self.latent_dim, 1, 1)).flatten(1)


class MinibatchStd(nn.Module):
    """Appends the batch's mean feature standard deviation as a channel (Karras et al.), against collapse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.float().std(dim=0, unbiased=False).mean().to(x.dtype)
        return torch.cat([x, std.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


class Discriminator(nn.Module):
    """image -> one logit per image. Strided convs, BatchNorm, LeakyReLU(0.2), as the study.

    ``spectral_norm`` wraps every conv (and drops BatchNorm, which it replaces); ``minibatch_std`` adds the
    batch-statistics channel before the last conv.
    """

    def __init__(self, image_size: int = 64, ndf: int = 64, channels: int = 1, spectral: bool = False,
                 minibatch_std: bool = False):
        super().__init__()
        levels = _levels(image_size)
        wrap = spectral_norm if spectral else (lambda m: m)
        norm = (lambda c: nn.Identity()) if spectral else nn.BatchNorm2d
        layers = [wrap(nn.Conv2d(channels, ndf, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(levels - 1):
            layers += [wrap(nn.Conv2d(width, width * 2, 4, 2, 1, bias=False)), norm(width * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        if minibatch_std:
            layers.append(MinibatchStd())
        layers.append(wrap(nn.Conv2d(width + int(minibatch_std), 1, 4, 1, 0, bias=False)))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).reshape(-1)
