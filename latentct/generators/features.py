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
# A diffusion generator's layers run once per DDIM step, so its methods read the output image ("" is G itself): the
# spectral method is then the image's pullback metric (Park et al., NeurIPS 2023).
DEFAULT_LAYERS = {"Generator": "main.5", "Decoder": "blocks.1", "DiffusionGenerator": ""}


def require_hooks(G: nn.Module, what: str) -> None:
    """A one-line error where G runs without forward hooks (TorchScript, exported programs)."""
    if not getattr(G, "hookable", True):
        kind = getattr(G, "reference", {}).get("kind", type(G).__name__)
        raise UserError(f"{what} needs a forward hook on an intermediate layer, and a {kind} generator has none: "
                        "use the learned method, random or coordinate")


def layers_in_call_order(G: nn.Module) -> dict[str, int]:
    """The modules with parameters of their own whose output depends on z, in the order a forward pass first
    calls them, each with how many times one forward pass calls it. A layer with parameters may not depend on
    z at all (a diffusion model's time embedding of a constant t): its output is the same for two latents run
    from the same random state (a sampler may draw noise of its own), and it is left out."""
    device = next(G.parameters(), torch.zeros(0)).device
    z = torch.zeros(2, G.latent_dim, device=device)
    z[1] = torch.randn(G.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    runs = [_first_outputs(G, latent[None]) for latent in z]
    (first, calls), (other, _) = runs
    return {name: calls[name] for name in first
            if first[name] is not None and other.get(name) is not None and not torch.equal(first[name], other[name])}


def _first_outputs(G: nn.Module, z: torch.Tensor) -> tuple[dict, dict]:
    """({name: first output tensor (or None)}, {name: calls}) of the parameterised modules over one forward
    pass, in call order, from a fixed random state."""
    first, calls, handles = {}, {}, []

    def record(name, output):
        calls[name] = calls.get(name, 0) + 1
        if name not in first:
            tensors = [output] if isinstance(output, torch.Tensor) else \
                [o for o in output if isinstance(o, torch.Tensor)] if isinstance(output, (tuple, list)) else []
            first[name] = tensors[0].detach().clone() if tensors else None

    for name, module in G.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: record(name, o)))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
            torch.manual_seed(0)
            G(z)
    finally:
        for handle in handles:
            handle.remove()
    return first, calls


def first_layer(G: nn.Module) -> str:
    """The first parameterised layer whose output depends on z (whose linear map SeFa and PCA read). Where it
    runs more than once per forward pass (a diffusion sampler's loop) there is no one first map of z."""
    require_hooks(G, "SeFa and PCA")
    reached = layers_in_call_order(G)
    if not reached:
        raise UserError(f"SeFa and PCA: no layer with parameters of {type(G).__name__} has an output that depends "
                        "on z; use the learned method, random or coordinate")
    name, calls = next(iter(reached.items()))
    if calls > 1:
        raise UserError(f"SeFa and PCA: {name!r}, the first layer whose output depends on z, runs {calls} times "
                        "per forward pass (a sampling loop), so there is no one first map of z to read; use the "
                        "learned method, spectral, random or coordinate")
    return name


def default_layer(G: nn.Module) -> str:
    """The layer LatentCLR and the spectral method read: the named default of our generators, else the second
    parameterised layer whose output depends on z."""
    require_hooks(G, "This method")
    name = DEFAULT_LAYERS.get(type(G).__name__)
    if name in dict(G.named_modules()):
        return name
    order = list(layers_in_call_order(G))
    if len(order) < 2:
        raise UserError(f"{type(G).__name__}: no intermediate layer whose output depends on z to hook; "
                        "pass --feature-layer")
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
