"""An intermediate layer of a generator as a function of z, through a forward hook: what LatentCLR contrasts and
whose Jacobian the spectral method decomposes. The forward pass stops at the layer (the rest is not computed)."""
from __future__ import annotations

import torch
import torch.nn as nn

from latentct.util.settings import UserError


class _Reached(Exception):
    """Raised by the hook to leave the forward pass once the layer's output is known."""


# The default layer per generator class: an intermediate block, past the first linear map of z (whose Jacobian
# SeFa already factorises) and early enough to be cheap: the DCGAN's second block (8 x 8), the VAE decoder's
# second residual block, as LatentCLR contrasts an early BigGAN block (its default generator.layers.0).
DEFAULT_LAYERS = {"Generator": "main.5", "Decoder": "blocks.1"}


def require_hooks(G: nn.Module, what: str) -> None:
    """A one-line error where G runs without forward hooks (TorchScript, exported programs)."""
    if not getattr(G, "hookable", True):
        kind = getattr(G, "reference", {}).get("kind", type(G).__name__)
        raise UserError(f"{what} needs a forward hook on an intermediate layer, and a {kind} generator has none: "
                        "use the learned method, random or coordinate")


def layers_in_call_order(G: nn.Module) -> list[str]:
    """The modules with parameters of their own, in the order a forward pass calls them."""
    order, handles = [], []
    for name, module in G.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            G(torch.zeros(1, G.latent_dim, device=next(G.parameters(), torch.zeros(0)).device))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def first_layer(G: nn.Module) -> str:
    """The first parameterised layer z reaches (whose linear map SeFa and PCA read)."""
    require_hooks(G, "SeFa and PCA")
    order = layers_in_call_order(G)
    if not order:
        raise UserError(f"{type(G).__name__}: no layer with parameters to hook; pass --feature-layer")
    return order[0]


def default_layer(G: nn.Module) -> str:
    """The layer LatentCLR and the spectral method read: the named default of our generators, else the second
    parameterised layer z reaches."""
    require_hooks(G, "This method")
    name = DEFAULT_LAYERS.get(type(G).__name__)
    if name in dict(G.named_modules()):
        return name
    order = layers_in_call_order(G)
    if len(order) < 2:
        raise UserError(f"{type(G).__name__}: no intermediate layer to hook; pass --feature-layer")
    return order[1]


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
