"""Embedding a real slice in a generator's latent space: the VAE's encoder, DDIM inversion for a diffusion model,
or optimising z for the DCGAN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm


def embed(G, x: torch.Tensor, encoder=None, steps: int = 300, restarts: int = 4, lr: float = 0.05,
          seed: int = 0, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, d) whose images reproduce ``x`` (B, 1, H, W) in [-1, 1], and the per-slice MSE.

    With an encoder its mean is the start (and the answer when ``steps`` is 0); otherwise the best of
    ``restarts`` random starts is refined by Adam on the pixel MSE (G frozen). With ``desc``, a bar over the
    optimisation steps.
    """
    b = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if encoder is not None:
        with torch.no_grad():
            starts = encoder(x)[0][None]
    elif hasattr(G, "invert"):  # a diffusion generator: its autoencoder and DDIM inversion give the start
        starts = G.invert(x)[None]
    else:
        starts = torch.randn(restarts, b, G.latent_dim, generator=gen)
    best_z, best_err = None, None
    bar = tqdm(total=len(starts) * steps, desc=desc, unit="step", leave=False, disable=desc is None or steps == 0)
    for start in starts:
        z = start.clone().requires_grad_(steps > 0)
        if steps > 0:
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                loss = F.mse_loss(G(z), x, reduction="none").flatten(1).mean(1).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
        with torch.no_grad():
            err = F.mse_loss(G(z), x, reduction="none").flatten(1).mean(1)
        if best_err is None:
            best_z, best_err = z.detach().clone(), err
        else:
            better = err < best_err
            best_z[better], best_err[better] = z.detach()[better], err[better]
    bar.close()
    return best_z, best_err
