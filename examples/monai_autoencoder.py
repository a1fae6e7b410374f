"""A MONAI AutoencoderKL (the first stage of the latent diffusion models trained on CT) as a LatentCT generator.

    python examples/monai_autoencoder.py --data data/demo/slices_64 --output runs/ae/ae.pt --steps 500
    python -m latentct.generators.latents --encoder examples/monai_autoencoder.py:make_encoder \
        --encoder-weights runs/ae/ae.pt --data data/demo/slices_64 --output runs/ae/latents.pt
    python Training/TrainDirections.py --preset demo --generator examples/monai_autoencoder.py:make_decoder \
        --generator-weights runs/ae/ae.pt --latents runs/ae/latents.pt --output runs/ae/learned
    python EvalDirections.py --directions runs/ae/learned/directions.pt --output Animations/ae --dataset data/demo/slices_64

The decoder declares what LatentCT needs: ``latent_shape`` (a spatial latent, channels x H/4 x W/4),
``output_range`` and ``output_window`` (the HU window it was trained in). Its latents are not N(0, I): the
directions are explored from encoded latents (``--latents``), and shifts are in units of their spread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

WINDOW = (-1000.0, 2000.0)  # the HU window of LatentCT's default preprocessing, which this model is trained in


def build(image_size: int = 64, channels=(8, 16, 16), latent_channels: int = 2) -> AutoencoderKL:
    """A small AutoencoderKL: len(channels) - 1 downsamplings, no attention (CPU-sized)."""
    return AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels),
                         latent_channels=latent_channels, num_res_blocks=1, norm_num_groups=4,
                         attention_levels=(False,) * len(channels))


class Decoder(nn.Module):
    """z (B, C, h, w) -> slices (B, 1, S, S) in [-1, 1] of WINDOW."""

    output_range = (-1.0, 1.0)
    output_window = WINDOW

    def __init__(self, image_size: int = 64, channels=(8, 16, 16), latent_channels: int = 2):
        super().__init__()
        self.ae = build(image_size, channels, latent_channels)
        side = image_size // 2 ** (len(channels) - 1)
        self.latent_shape = (latent_channels, side, side)

    def forward(self, z):
        return torch.tanh(self.ae.decode(z))


class Encoder(nn.Module):
    """slices (B, 1, S, S) -> (mean, sigma) of the latent."""

    def __init__(self, image_size: int = 64, channels=(8, 16, 16), latent_channels: int = 2):
        super().__init__()
        self.ae = build(image_size, channels, latent_channels)

    def forward(self, x):
        return self.ae.encode(x)


def make_decoder(image_size: int = 64, channels=(8, 16, 16), latent_channels: int = 2) -> Decoder:
    return Decoder(image_size, channels, latent_channels)


def make_encoder(image_size: int = 64, channels=(8, 16, 16), latent_channels: int = 2) -> Encoder:
    return Encoder(image_size, channels, latent_channels)


def train(data: str, output: str, steps: int = 500, image_size: int = 64, batch: int = 32, seed: int = 0,
          kl_weight: float = 1e-4, channels=(8, 16, 16), latent_channels: int = 2) -> Path:
    """Train the autoencoder on a preprocessed split (MSE + a small KL); write the decoder's state dict, whose
    keys (ae.*) the encoder shares."""
    from latentct.data.slices import CTSlices

    torch.manual_seed(seed)
    slices = CTSlices(data, "train", window=WINDOW)
    model = Decoder(image_size, channels, latent_channels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(slices), (batch,), generator=gen)
        x = torch.stack([slices[int(i)] for i in idx])
        mu, sigma = model.ae.encode(x)
        z = mu + sigma * torch.randn_like(sigma)
        recon = torch.tanh(model.ae.decode(z))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).flatten(1).sum(1).mean()
        loss = F.mse_loss(recon, x) + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, output)
    print(f"autoencoder, last loss {float(loss):.4f} -> {output}")
    return Path(output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train the example MONAI autoencoder on preprocessed slices.")
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    sys.exit(0 if train(args.data, args.output, args.steps, args.image_size) else 1)
