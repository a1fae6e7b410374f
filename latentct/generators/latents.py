"""Encode a preprocessed split through an autoencoder's encoder: the latents an autoencoder's decoder is explored
from (its latents are not N(0, I)).

    python -m latentct.generators.latents --encoder my_model.py:make_encoder --encoder-weights ae.pt \
        --data data/demo/slices_64 --output runs/my_ae/latents.pt

The encoder is a factory (``file.py:name`` or ``package.module:name``) returning a module whose output for a
batch (B, 1, S, S) in [-1, 1] of ``--window`` is the latents, or a tuple whose first element is (a mean).
Writes ``{"latents": (N, *latent_shape), "encoder", "data", "split", "window"}``; pass the file to the later
stages as ``--latents``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from latentct.data.slices import CTSlices
from latentct.generators.plugins import load_factory, load_weights
from latentct.util.io import atomic_torch_save
from latentct.util.settings import check, run_cli, setting


@dataclass
class Settings:
    """Encode a preprocessed split into latents."""

    encoder: str = setting("model.py:make_encoder", "the encoder: file.py:factory or package.module:factory")
    encoder_args: str = setting("{}", "keyword arguments of the factory, as JSON")
    encoder_weights: str | None = setting(None, "its weights (a state dict, loaded with weights_only=True)")
    data: str = setting("data/demo/slices_64", "preprocessed dataset folder")
    split: str = setting("train", "which split to encode", choices=("train", "test"))
    window: str = setting("default", "HU window the encoder expects its inputs in")
    output: str = setting("latents.pt", "where to write the latents")
    batch_size: int = setting(64, "slices per encoder call")

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", "must be at least 1")


@torch.no_grad()
def encode(encoder: torch.nn.Module, slices: CTSlices, batch: int) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(slices), batch), desc="encoding", unit="batch", leave=False):
        x = torch.stack([slices[i] for i in range(start, min(start + batch, len(slices)))])
        z = encoder(x)
        out.append((z[0] if isinstance(z, (tuple, list)) else z).float())
    return torch.cat(out)


def main(cfg: Settings) -> torch.Tensor:
    encoder, _ = load_factory(cfg.encoder, json.loads(cfg.encoder_args))
    if cfg.encoder_weights:
        load_weights(encoder, cfg.encoder_weights)
    latents = encode(encoder.eval(), CTSlices(cfg.data, cfg.split, window=cfg.window), cfg.batch_size)
    atomic_torch_save({"latents": latents, "encoder": cfg.encoder, "data": str(cfg.data), "split": cfg.split,
                       "window": cfg.window}, Path(cfg.output))
    print(f"{len(latents)} latents of shape {tuple(latents.shape[1:])} (mean per-dimension std "
          f"{float(latents.flatten(1).std(0).mean()):.3f}) -> {cfg.output}")
    return latents


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.generators.latents")
