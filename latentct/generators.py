"""The one generator interface: anything with ``latent_dim`` and ``forward(z (B, d)) -> (B, 1, H, W)`` in [-1, 1].

``generator.pt`` holds the weights plus the architecture arguments, so ``load_generator(path)`` rebuilds the
DCGAN generator or the VAE decoder with no script; the VAE's file also carries its encoder.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch.nn as nn

from latentct.io import atomic_torch_save
from latentct.settings import UserError
from models import dcgan, vae

KINDS = {"dcgan": dcgan.Generator, "vae": vae.Decoder}


def save_generator(path: str | Path, kind: str, model: nn.Module, args: dict, window, dataset: str,
                   encoder: nn.Module | None = None, encoder_args: dict | None = None) -> None:
    from latentct.data import parse_window

    state = {"kind": kind, "args": dict(args), "state_dict": _plain_state(model), "window": list(parse_window(window)),
             "dataset": str(dataset), "format": 1}
    if encoder is not None:
        state["encoder_state_dict"] = _plain_state(encoder)
        state["encoder_args"] = dict(encoder_args or args)
    atomic_torch_save(state, path)


def _plain_state(model: nn.Module) -> dict:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)     # DistributedDataParallel wrapper
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _read(path: str | Path) -> dict:
    from latentct.checkpoint import load_file

    state = load_file(path, "generator file")
    if not isinstance(state, dict) or state.get("kind") not in KINDS:
        raise UserError(f"{path}: not a LatentCT generator file (kind {state.get('kind') if isinstance(state, dict) else '?'})")
    return state


def load_generator(path: str | Path, device="cpu") -> nn.Module:
    """Rebuild a generator from its file, frozen and in eval mode."""
    state = _read(path)
    model = KINDS[state["kind"]](**state["args"])
    model.load_state_dict(state["state_dict"])
    model.window = tuple(state["window"])
    return model.to(device).eval().requires_grad_(False)


def load_encoder(path: str | Path, device="cpu") -> nn.Module | None:
    """The VAE's encoder stored beside its decoder, or None for generators without one."""
    state = _read(path)
    if "encoder_state_dict" not in state:
        return None
    model = vae.Encoder(**state["encoder_args"])
    model.load_state_dict(state["encoder_state_dict"])
    return model.to(device).eval().requires_grad_(False)


def generator_info(path: str | Path) -> dict:
    state = _read(path)
    return {k: state[k] for k in ("kind", "args", "window", "dataset")}


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
