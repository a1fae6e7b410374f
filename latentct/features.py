"""An intermediate layer of a generator as a function of z, through a forward hook: what LatentCLR contrasts and
whose Jacobian the spectral method decomposes. The forward pass stops at the layer (the rest is not computed)."""
from __future__ import annotations

import torch
import torch.nn as nn

from latentct.settings import UserError


class _Reached(Exception):
    """Raised by the hook to leave the forward pass once the layer's output is known."""


# The default layer per generator class: an intermediate block, past the first linear map of z (whose Jacobian
# SeFa already factorises) and early enough to be cheap: the DCGAN's second block (8 x 8), the VAE decoder's
# second residual block, as LatentCLR contrasts an early BigGAN block (its default generator.layers.0).
DEFAULT_LAYERS = {"Generator": "main.5", "Decoder": "blocks.1"}


def default_layer(G: nn.Module) -> str:
    name = DEFAULT_LAYERS.get(type(G).__name__)
    modules = dict(G.named_modules())
    if name in modules:
        return name
    # any other generator: the output of the second parameterised module that z reaches
    seen = [n for n, m in G.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if len(seen) < 2:
        raise UserError(f"{type(G).__name__}: no intermediate layer to hook; pass --feature-layer")
    return seen[1]


def layer_features(G: nn.Module, name: str):
    """A function z -> (B, m) flattened output of the module ``name`` of G."""
    modules = dict(G.named_modules())
    if name not in modules:
        raise UserError(f"--feature-layer: {type(G).__name__} has no module {name!r} "
                        f"(it has {', '.join(n for n in list(modules)[1:12])}, ...)")
    module = modules[name]

    def features(z: torch.Tensor) -> torch.Tensor:
        captured = []

        def hook(_module, _inputs, output):
            captured.append(output)
            raise _Reached

        handle = module.register_forward_hook(hook)
        try:
            G(z)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise UserError(f"--feature-layer: the forward pass of {type(G).__name__} never reached {name!r}")
        return captured[0].flatten(1)

    return features
