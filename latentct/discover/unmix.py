"""Unmixing a span: a non-orthogonal basis inside the top-m directions of an orthogonal method (SeFa, spectral).

Orthogonal methods can find the span the factors move in and still cut it along the wrong axes: where the
generator's factor directions are not orthogonal, no orthogonal basis is made of them. Two label-free ways to
find a basis inside the span whose directions each move one thing:

- ``ica``: draw latents, read label-free features of G(z) (an intermediate layer of the generator, or the VAE
  encoder's codes), reduce them by PCA to m dimensions and run FastICA; then regress the latents' coordinates in
  the span on the sources: row j of the map is the span direction that moves source j alone. The span's
  coordinates are Gaussian under the prior, so features linear in them give Gaussian sources that ICA cannot
  tell apart: only the generator's nonlinearity leaves it something to separate, and the sources must still
  map back to the coordinates by a line. The R2 of the features' linear fit on the coordinates is reported as
  ``linearity``: near 1, ICA has nothing to find (FastICA then tends not to converge, ``converged``); low, the
  sources do not map back.
- ``ajd``: approximate joint diagonalisation of the pullback metrics J(z)^T J(z), J the Jacobian of the image
  with respect to the span's coordinates at >= 4m latents (Pham 2000, pyriemann's ``ajd_pham``; no orthogonality
  constraint). If the image changes of the factor directions are orthogonal in pixel space at every latent while
  their sizes vary from latent to latent, the diagonaliser's rows are those directions.

Both return (m, d) unit latent directions: ``ajd``'s ordered by how much they move the image, ``ica``'s by the
latent change per unit source.
"""
from __future__ import annotations

import numpy as np
import torch

from latentct.discover.baselines import fix_signs, single_threaded
from latentct.generators.interface import sample_latents
from latentct.util.settings import UserError

UNMIX_BY = ("ajd", "ica")


def span_coordinates(G, basis: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the prior and their coordinates in the span of the (m, d) orthonormal rows ``basis``."""
    z = sample_latents(G, samples, torch.Generator().manual_seed(seed * 7919 + 41))
    return z, z.double() @ basis.double().t()


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(rows.double().t())
    return q.t()


@torch.no_grad()
def _features(G, kind: str, z: torch.Tensor, encoder=None) -> torch.Tensor:
    if kind == "image":
        return torch.cat([G(part).flatten(1) for part in z.split(256)]).double()
    if kind == "encoder":
        if encoder is None:
            raise UserError("--unmix-features encoder: this generator has no encoder (a VAE's has)")
        return torch.cat([encoder(G(part))[0].flatten(1) for part in z.split(256)]).double()
    from latentct.generators.features import default_layer, layer_features

    layer = default_layer(G) if kind == "layer" else kind
    features = layer_features(G, layer)
    return torch.cat([features(part).flatten(1) for part in z.split(256)]).double()


def by_ica(G, rows: torch.Tensor, features: str = "layer", samples: int = 2048, seed: int = 0,
           encoder=None) -> tuple[torch.Tensor, dict]:
    """FastICA of the features' top-m principal components over latents of the prior; the span's coordinates
    regressed on the sources give each source's direction."""
    from sklearn.decomposition import PCA, FastICA

    basis = orthonormal_rows(rows)
    m = len(basis)
    z, coords = span_coordinates(G, basis, samples, seed)
    feats = _features(G, features, z, encoder).numpy()
    with single_threaded():
        reduced = PCA(m, random_state=seed).fit_transform(feats)
        # how linear the features are in the span's coordinates: R2 of the reduced features on them
        design = np.c_[coords.numpy(), np.ones(len(coords))]
        fit = np.linalg.lstsq(design, reduced, rcond=None)[0]
        linearity = 1 - ((design @ fit - reduced) ** 2).sum() / ((reduced - reduced.mean(0)) ** 2).sum()
        model = FastICA(m, whiten="unit-variance", max_iter=10000, random_state=seed)
        sources = model.fit_transform(reduced)
        sources = (sources - sources.mean(0)) / sources.std(0)
        design = np.c_[sources, np.ones(len(sources))]
        per_source = np.linalg.lstsq(design, coords.numpy() - coords.numpy().mean(0), rcond=None)[0][:m]  # (m, m)
    directions = torch.from_numpy(per_source) @ basis                     # (m, d) latent change per unit source
    order = torch.argsort(directions.norm(dim=1), descending=True)
    directions = torch.nn.functional.normalize(directions[order], dim=1)
    return fix_signs(directions).float(), {"unmix_by": "ica", "features": features, "samples": samples,
                                           "linearity": round(float(linearity), 4), "iterations": int(model.n_iter_),
                                           "converged": bool(model.n_iter_ < model.max_iter)}


def pullback_metrics(G, basis: torch.Tensor, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N, m, m) metrics J^T J of the images at the latents ``z`` in the span's coordinates, J by forward-mode
    products along the m basis rows (never a full Jacobian in the latent)."""
    import torch.autograd.forward_ad as fwAD

    m = len(basis)
    tangents = basis.float()
    out = []
    per = max(1, chunk // m)
    for zi in z.split(per):
        points = zi.repeat_interleave(m, 0)
        with torch.no_grad(), fwAD.dual_level():
            image = G(fwAD.make_dual(points, tangents.repeat(len(zi), 1)))
            J = fwAD.unpack_dual(image).tangent
        if J is None:
            raise UserError("unmixing by ajd: the generator's output does not depend on z through forward mode")
        J = J.double().reshape(len(zi), m, -1)                           # (n, m, pixels)
        out.append(J @ J.transpose(1, 2))
    return torch.cat(out)


def by_ajd(G, rows: torch.Tensor, latents: int | None = None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Rows of the approximate joint diagonaliser of the pullback metrics at ``latents`` (default 8 m) latents."""
    from pyriemann.geometry.ajd import ajd_pham

    basis = orthonormal_rows(rows)
    m = len(basis)
    latents = latents or 8 * m
    if latents < 4 * m:
        raise UserError(f"--unmix-latents: the joint diagonalisation needs at least 4 m = {4 * m} latents")
    z, _ = span_coordinates(G, basis, latents, seed)
    metrics = pullback_metrics(G, basis, z)
    scale = metrics.diagonal(dim1=1, dim2=2).mean()
    metrics = metrics / scale + 1e-6 * torch.eye(m, dtype=torch.float64)  # SPD, on a common scale
    with single_threaded():
        V, D = ajd_pham(metrics.numpy(), eps=1e-8, n_iter_max=500)
    V = torch.from_numpy(np.ascontiguousarray(V))
    offdiag = np.abs(D - np.einsum("nii->ni", D)[:, :, None] * np.eye(m)).sum() / np.abs(D).sum()
    directions = V @ basis                                               # (m, d)
    directions = torch.nn.functional.normalize(directions, dim=1)
    moved = torch.einsum("ij,njk,ik->i", directions @ basis.t(), metrics, directions @ basis.t())
    order = torch.argsort(moved, descending=True)
    return fix_signs(directions[order]).float(), {"unmix_by": "ajd", "latents": latents,
                                                  "off_diagonal": round(float(offdiag), 4)}


def unmix(G, rows: torch.Tensor, by: str = "ajd", features: str = "layer", samples: int = 2048,
          seed: int = 0, encoder=None) -> tuple[torch.Tensor, dict]:
    """(m, d) directions inside the span of the (m, d) ``rows``, by ``ajd`` or ``ica`` (``encoder``: a VAE's, for
    ``features="encoder"``)."""
    if by == "ajd":
        return by_ajd(G, rows, seed=seed)
    if by == "ica":
        return by_ica(G, rows, features, samples, seed, encoder)
    raise UserError(f"--unmix-by: {by!r} is not one of {', '.join(UNMIX_BY)}")
