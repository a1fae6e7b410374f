"""Right subspace, wrong basis? A method's count alone cannot tell a method that found the span of the factor
directions but cut it along the wrong axes from one that missed the span. For each method, against the span of
the supervised directions:

- the principal angles between the two spans (Björck & Golub 1973, via scipy.linalg.subspace_angles);
- for each factor, the share of its supervised direction's norm that lies inside the method's span, beside the
  share a random span of the same size holds on average, about sqrt(k / d);
- the span ceiling: the supervised map refitted inside the method's span (with the fit oracle, on the fit's
  own latents) gives the directions V (B_V)^+ e_f, scored like every other direction: "recovered if the basis
  were right".

On real data there is no oracle, but a dataset preprocessed with label columns (preprocess.py --labels) gives
the same diagnostic against directions fitted to those labels from real slices encoded into the latent (the
VAE's encoder, or the DCGAN's embedding): ``label_directions``. On the phantom, whose factors are such columns,
the angles between those and the oracle's supervised directions show how far the label fit can be trusted.

Methods that rank their directions (SeFa, PCA and the spectral method, by eigenvalue) are judged on their top
k = recoverable_at[headline] directions; unordered ones (learned, random, coordinate, DisCo, LatentCLR) on all.

Angles and shares in the latent's own coordinates mislead where the generator ignores part of its latent: a VAE
leaves most of its dimensions unused, a supervised direction fitted there carries fit noise in them, and a span
that holds all of a factor's image change can still hold little of its latent norm (and a random span's chance,
sqrt(k/d), counts the dead dimensions too). So the same angles and shares are also measured on the image changes
the directions make (``image_coordinates``: the pullback metric's inner products J(z)v . J(z)w averaged over
latents), with the chance level measured on random spans of the same size; and the span ceiling gets the ceiling
of random spans of the same size beside it, since a large enough span holds every factor whatever its basis.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

RANKED = ("sefa", "pca", "spectral", "hpca")  # directions come sorted by eigenvalue: the top k are the method's answer


def span_size(method: str, count: int, recoverable: int | None) -> int:
    """How many of a method's directions make its span: the top ``recoverable`` of a ranked method, else all."""
    if method in RANKED and recoverable is not None:
        return min(count, recoverable)
    return count


def orthonormal_basis(rows: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """(k, d) directions -> (d, r) orthonormal basis of their span (r = their rank: singular values above ``tol``
    of the largest)."""
    a = rows.double().t().numpy()
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    rank = int((s > s.max(initial=0.0) * tol).sum()) if s.size else 0
    return torch.from_numpy(u[:, :rank].copy())


def principal_angles(rows: torch.Tensor, other: torch.Tensor) -> list[float]:
    """Principal angles in degrees, smallest first, between the spans of two sets of (k, d) rows."""
    if len(rows) == 0 or len(other) == 0:
        return []
    angles = scipy.linalg.subspace_angles(rows.double().t().numpy(), other.double().t().numpy())
    return sorted(float(math.degrees(a)) for a in angles)


def share_in_span(basis: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
    """For each of the (m, d) ``vectors``, the share of its norm inside the span of the (d, r) orthonormal
    ``basis``: |P v| / |v|."""
    v = vectors.double()
    inside = (v @ basis.double()).norm(dim=1) if basis.shape[1] else torch.zeros(len(v), dtype=torch.float64)
    return (inside / v.norm(dim=1).clamp_min(1e-12)).numpy()


def chance_share(k: int, d: int) -> float:
    """The norm share a random k-dimensional span of a d-dimensional latent holds of a fixed direction: the root
    of the expected squared share k / d."""
    return math.sqrt(k / d) if d else 0.0


def diagnose(rows: torch.Tensor, supervised: torch.Tensor, k: int, factors, dim: int | None = None
             ) -> tuple[dict, torch.Tensor]:
    """The first ``k`` of a method's (K, d) rows against the (F, d) supervised directions: the subspace entry of
    ground_truth.json (without the span ceiling) and the span's (d, r) orthonormal basis. ``dim``: how many
    dimensions directions can live in, for the chance level (default d; a diffusion h view's dh block is less)."""
    top = rows[:k]
    basis = orthonormal_basis(top) if k else torch.zeros(rows.shape[1], 0, dtype=torch.float64)
    shares = share_in_span(basis, supervised)
    return {"k": int(k), "rank": int(basis.shape[1]), "angles_deg": [round(a, 2) for a in
                                                                      principal_angles(top, supervised)],
            "chance": round(chance_share(int(basis.shape[1]), dim or rows.shape[1]), 4),
            "share_in_span": {f: round(float(s), 4) for f, s in zip(factors, shares)}}, basis


# Image coordinates come from float32 Jacobians: a span that is rank-deficient in the image (two directions that
# draw the same change) keeps singular values at that noise level, about 1e-4 of the largest, not at 1e-8.
IMAGE_TOL = 1e-3


def image_gram(G, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(n, n) mean over the latents ``z`` of the inner products of the image changes J(z) r_i . J(z) r_j of the
    (n, latent_dim) ``rows`` (forward-mode products, one per row and latent; never a full Jacobian)."""
    from latentct.discover.unmix import span_jacobians

    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    for J in span_jacobians(G, rows, z):
        J = J.flatten(2)
        gram += (J @ J.transpose(1, 2)).sum(0)
    return gram / len(z)


def image_coordinates(gram: torch.Tensor) -> torch.Tensor:
    """(n, n) rows whose dot products are ``gram``'s: each direction's image change in n Euclidean coordinates,
    so the angles and shares above apply unchanged."""
    w, e = torch.linalg.eigh((gram + gram.T) / 2)
    return e * w.clamp_min(0).sqrt()


def _span_shares(gram: torch.Tensor, span: list[int], supervised: list[int]) -> tuple[np.ndarray, list]:
    """From the image ``gram`` of many rows: each ``supervised`` row's share of its image change inside the image
    changes of the ``span`` rows' span, and the principal angles between the two (indices into the gram)."""
    idx = span + supervised
    coords = image_coordinates(gram[idx][:, idx])
    mine, sup = coords[:len(span)], coords[len(span):]
    basis = orthonormal_basis(mine, IMAGE_TOL)
    return share_in_span(basis, sup), principal_angles(torch.as_tensor(basis.T), sup) if basis.shape[1] else []


def image_shares(G, rows: torch.Tensor, supervised: torch.Tensor, z: torch.Tensor) -> tuple[np.ndarray, list]:
    """Each supervised direction's share of its image change inside the image changes of the span of ``rows``
    ((k, latent_dim)), and the principal angles between the two."""
    gram = image_gram(G, torch.cat([rows, supervised]), z)
    return _span_shares(gram, list(range(len(rows))), list(range(len(rows), len(gram))))


def random_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    """(count, dim) random unit rows from ``seed``, drawn one at a time, so the first k are the same whatever
    ``count`` is (one draw of torch.randn(count, dim) fills large tensors another way than small ones)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(count)]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1) if rows else torch.zeros(0, dim)


def diagnose_images(G, tops: dict[str, torch.Tensor], supervised: torch.Tensor, randoms: list[torch.Tensor],
                    z: torch.Tensor, factors) -> dict[str, dict]:
    """The subspace entry's ``image`` part for each method's span (``tops``: name -> its (k, latent_dim) top
    rows): principal angles between its image changes and the supervised directions', each factor's share inside
    it, and beside them the chance level, the mean share inside random spans of the same size. ``randoms`` are
    nested: the random k-span of draw j is ``randoms[j][:k]``, so each draw is one sequence of rows as long as the
    largest span, and a method's chance does not depend on which other methods are diagnosed with it (none
    without random rows). One gram holds every row, so each image change is computed once, not once per span."""
    blocks = [supervised, *randoms, *tops.values()]
    gram = image_gram(G, torch.cat(blocks), z)
    starts = np.cumsum([0] + [len(b) for b in blocks]).tolist()
    sup = list(range(len(supervised)))

    def rows(block: int, k: int) -> list[int]:
        return list(range(starts[block], starts[block] + k))

    chance = {}
    for k in sorted({len(top) for top in tops.values()}):
        drawn = [_span_shares(gram, rows(1 + j, k), sup)[0] for j, r in enumerate(randoms) if len(r) >= k]
        chance[k] = {f: round(float(v), 4) for f, v in zip(factors, sum(drawn) / len(drawn))} if drawn else None
    out = {}
    for i, (name, top) in enumerate(tops.items()):
        shares, angles = _span_shares(gram, rows(1 + len(randoms) + i, len(top)), sup)
        out[name] = {"latents": int(len(z)), "angles_deg": [round(a, 2) for a in angles],
                     "share_in_span": {f: round(float(v), 4) for f, v in zip(factors, shares)},
                     "chance": chance[len(top)]}
    return out


class Basis:
    """Fixed unit directions with the ``shifts`` of a loaded directions file, so the scorer's sweep takes them."""

    def __init__(self, rows: torch.Tensor):
        self.matrix = rows.float()
        self.count = len(rows)

    def shifts(self, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps.float()[:, None] * self.matrix[k]


def label_directions(encode, slices, columns: list[str], count: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(L, d) unit directions, each the change of the latent per unit of one label column with the others held
    (a least-squares fit of the codes on the labels: the pattern, Haufe et al. 2014), from ``count`` real slices
    (a seeded draw of ``slices``, a CTSlices with those label columns) and their codes ``encode(images)``. Two
    thirds fit; on the last third each column's R2 from the codes (a fit of the labels on the codes) says how
    much of it the latent holds. Patterns, not the least-norm inverse of a labels-on-codes fit: codes that hardly
    vary (latent dimensions the decoder leaves unused) get weights from noise in such a fit, and its inverse
    points into them. Under an isotropic prior both span the row space of the labels' linear map, so their
    principal angles compare like with like; one by one the directions differ where labels are noisy and
    correlated."""
    from latentct.discover.baselines import fit_directions, single_threaded

    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(slices), generator=gen)[: min(count, len(slices))].tolist()
    images, labels = zip(*(slices[i] for i in picked))
    images, labels = torch.stack(images), torch.stack(labels).double()
    keep = torch.isfinite(labels).all(1)
    images, labels = images[keep], labels[keep]
    spread = labels.std(0)
    if len(labels) < 12 or not (spread > 0).all():
        flat = [c for c, s in zip(columns, spread) if not s > 0]
        raise ValueError(f"{len(labels)} labelled slices" + (f"; constant column(s) {', '.join(flat)}" if flat else ""))
    with torch.no_grad():
        z = torch.cat([encode(part) for part in images.split(256)]).double()
    fit = 2 * len(z) // 3
    _, info = fit_directions(z, labels, fit, names=columns)           # labels on codes: the held-out R2
    design = torch.cat([labels[:fit], torch.ones(fit, 1, dtype=torch.float64)], 1)
    with single_threaded():
        patterns = torch.linalg.lstsq(design, z[:fit]).solution[:-1]     # (L, d): codes on labels
    directions = patterns / patterns.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return directions.float(), {"columns": list(columns), "slices": int(len(z)), "fit_r2": info["fit_r2"],
                                "condition_number": info["condition_number"]}
