"""Closed-form and trivial direction baselines, on the same (K, d) footing as the learned directions.

- SeFa (Shen & Zhou 2021): eigenvectors of A^T A, A the Jacobian of the generator's first linear map of z,
  taken through autograd (``G.first_layer``, or a forward hook on the first parameterised layer whose output
  depends on z).
- PCA of early activations regressed back to z (the GANSpace recipe, Härkönen et al. 2020): PCA of z
  itself is meaningless for a Gaussian z.
- ICA and sparse PCA of a nonlinear layer's activations, regressed back to z (GANSpace's other estimators,
  harskish/ganspace estimators.py): unlike PCA and SeFa their directions need not be orthogonal. On the first
  layer (affine in z, so Gaussian) ICA has nothing to find; they read the layer the spectral method reads.
- Random orthonormal directions and coordinate axes.
- The supervised ceiling (InterFaceGAN's conditional directions, Shen et al. 2020, for continuous factors):
  a linear model F ~ B z + c of the oracle's readings of G(z); the direction that moves factor f by one unit
  and holds the others is column f of pinv(B).
- The same fit with the anatomy measurements of G(z) (latentct/score/anatomy.py: lung and body area, position,
  rotation, thickness, width, ...) in place of the oracle's readings: label-free in the sense that real CT has
  them too, but they sit close to the phantom's factors, so the tables mark it "uses anatomy measurements" and
  never rank it among the label-free methods (issue 17).
"""
from __future__ import annotations

import contextlib

import torch

from latentct.generators.interface import sample_latents
from latentct.util.settings import UserError


def _first_layer(G):
    """The first linear map of z: the generator's own ``first_layer`` where it has one (our DCGAN and VAE decoder),
    else the output of the first parameterised layer whose output depends on z, through a forward hook."""
    if hasattr(G, "first_layer"):
        return G.first_layer
    from latentct.generators.features import first_layer, layer_features

    return layer_features(G, first_layer(G))


def first_layer_jacobian(G) -> torch.Tensor:
    """(m, d): the exact Jacobian of the first layer at z = 0 (the map is affine, so it is the same anywhere)."""
    layer = _first_layer(G)
    z0 = torch.zeros(1, G.latent_dim, device=next(G.parameters(), torch.zeros(0)).device)
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda z: layer(z[None])[0], z0[0])
    return jac.detach()


@contextlib.contextmanager
def single_threaded():
    """One thread for the block: multithreaded LAPACK (SVD, least squares) is not bit-stable between runs, and
    a different last bit can flip an eigenvector's sign. The tables of two runs must be identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """Each row with its largest-magnitude entry positive: an eigenvector's sign is arbitrary, this one is not."""
    pick = rows.abs().argmax(dim=1)
    return rows * torch.sign(rows[torch.arange(len(rows)), pick])[:, None]


def sefa(G, count: int) -> torch.Tensor:
    """(K, d) unit directions: top eigenvectors of A^T A."""
    A = first_layer_jacobian(G).double()
    with single_threaded():
        values, vectors = torch.linalg.eigh(A.t() @ A)
    order = torch.argsort(values, descending=True)[: min(count, G.latent_dim)]
    return fix_signs(vectors[:, order].t()).float().contiguous()


@torch.no_grad()
def pca(G, count: int, samples: int = 2048, seed: int = 0) -> torch.Tensor:
    """(K, d) unit directions: principal components of first-layer activations, transferred to z by regression.
    Computed in float64 on one thread with fixed signs, so two runs give the same directions."""
    layer = _first_layer(G)
    gen = torch.Generator().manual_seed(seed)
    z = sample_latents(G, samples, gen)
    with single_threaded():
        act = torch.cat([layer(part) for part in z.split(256)]).double()
        act = act - act.mean(0)
        count = min(count, G.latent_dim, samples)
        _, _, v = torch.linalg.svd(act, full_matrices=False)
        coords = act @ v[:count].t()                           # (N, K) coordinates along the components
        coef = torch.linalg.lstsq(coords, z.double()).solution  # z ~ coords @ coef: row k is component k's z direction
    return fix_signs(torch.nn.functional.normalize(coef, dim=1)).float()


@torch.no_grad()
def layer_activations(G, layer: str | None, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``samples`` latents of the prior and the activations of ``layer`` (default: the layer the spectral method
    reads, past a nonlinearity), in float64, in the layer's own shape."""
    from latentct.generators.features import default_layer, layer_features

    layer = layer or default_layer(G)
    features = layer_features(G, layer)
    shapes = []
    handle = dict(G.named_modules())[layer].register_forward_hook(lambda m, i, o: shapes.append(o.shape[1:]))
    try:
        z = sample_latents(G, samples, torch.Generator().manual_seed(seed))
        act = torch.cat([features(part) for part in z.split(256)]).double()
    finally:
        handle.remove()
    return z, act.reshape(len(z), *shapes[0]), layer


def regress_to_latent(coords: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(N, K) coordinates of samples along components -> (K, d) unit latent directions: the least-squares map
    z ~ coords @ coef (GANSpace's transfer of activation-space components to the latent)."""
    coords = (coords - coords.mean(0)) / coords.std(0).clamp_min(1e-12)
    with single_threaded():
        coef = torch.linalg.lstsq(coords, z.double() - z.double().mean(0)).solution
    return fix_signs(torch.nn.functional.normalize(coef, dim=1)).float()


def ica(G, count: int, layer: str | None = None, samples: int = 2048, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(K, d) unit directions: FastICA sources of a nonlinear layer's activations (whitened to K components,
    logcosh contrast, up to 10,000 iterations, as GANSpace's ICAEstimator), sorted by the spread of the
    activations along each unmixing row, regressed back to z."""
    from sklearn.decomposition import FastICA

    z, act, layer = layer_activations(G, layer, samples, seed)
    act = act.flatten(1)
    count = min(count, G.latent_dim, samples)
    with single_threaded():
        model = FastICA(count, whiten="unit-variance", max_iter=10000, random_state=seed)
        sources = torch.from_numpy(model.fit_transform(act.numpy()))
    rows = torch.from_numpy(model.components_)
    spread = ((act - act.mean(0)) @ torch.nn.functional.normalize(rows, dim=1).t()).std(0)
    order = torch.argsort(spread, descending=True)
    return regress_to_latent(sources[:, order], z), {"layer": layer, "samples": samples,
                                                       "iterations": int(model.n_iter_),
                                                       "converged": bool(model.n_iter_ < model.max_iter)}


def sparse_pca(G, count: int, layer: str | None = None, samples: int = 512, seed: int = 0, alpha: float = 1.0,
               pool: int = 4) -> tuple[torch.Tensor, dict]:
    """(K, d) unit directions: sparse PCA (sklearn's SparsePCA, ridge 0.01 and 100 iterations as GANSpace's
    SPCAEstimator) of a nonlinear layer's activations on 512 latents, average-pooled to ``pool`` x ``pool`` per
    channel (the demo DCGAN's 8 x 8 x 128 block: 2,048 features, 118 s on 2 cores); components
    sorted by the spread of their codes, regressed back to z. ``alpha`` (sparsity) is GANSpace's command-line
    default (--sparsity 1.0), on activations scaled to unit mean square so it means the same for every
    generator."""
    from sklearn.decomposition import SparsePCA

    z, act, layer = layer_activations(G, layer, samples, seed)
    if act.dim() == 4 and act.shape[-1] > pool:
        act = torch.nn.functional.adaptive_avg_pool2d(act, pool)
    act = act.flatten(1)
    count = min(count, G.latent_dim, samples)
    centred = act - act.mean(0)
    centred = (centred / centred.pow(2).mean().sqrt().clamp_min(1e-12)).numpy()  # alpha means the same at any scale
    model = SparsePCA(count, alpha=alpha, ridge_alpha=0.01, max_iter=100, random_state=seed)
    codes = torch.from_numpy(model.fit_transform(centred))
    kept = codes.std(0) > 0  # a component the sparsity emptied moves nothing: left out
    if not kept.any():
        raise UserError(f"sparse PCA: alpha {alpha} leaves every component empty on {layer!r}; pass a smaller one")
    codes = codes[:, kept]
    order = torch.argsort(codes.std(0), descending=True)
    return regress_to_latent(codes[:, order], z), {"layer": layer, "samples": samples, "alpha": alpha,
                                                     "pooled_to": pool, "iterations": int(model.n_iter_)}


def random_orthonormal(latent_dim: int, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=gen))
    return q.t()[: min(count, latent_dim)].contiguous()


def coordinate_axes(latent_dim: int, count: int) -> torch.Tensor:
    return torch.eye(latent_dim)[: min(count, latent_dim)]


def baseline_matrix(method: str, G, count: int, seed: int = 0) -> torch.Tensor:
    """Random and coordinate directions live in G's direction block (all of z, or dh in a diffusion h view)."""
    from latentct.generators.interface import direction_block, in_block

    start, stop = direction_block(G)
    if method == "sefa":
        return sefa(G, count)
    if method == "pca":
        return pca(G, count, seed=seed)
    if method == "random":
        return in_block(G, random_orthonormal(stop - start, count, seed))
    if method == "coordinate":
        return in_block(G, coordinate_axes(stop - start, count))
    if method == "hpca":
        return h_pca(G, count, seed)
    raise UserError(f"--method: {method!r} is not learned, sefa, pca, random, coordinate or hpca")


def h_pca(G, count: int, seed: int = 0) -> torch.Tensor:
    """(K, d): the principal components of a diffusion model's h over samples and the edit window's steps (Haas et
    al. 2023), as directions of dh in the h view."""
    from latentct.generators.diffusion import h_principal_components
    from latentct.generators.interface import in_block

    if getattr(G, "view", None) != "h":
        raise UserError("--method hpca: needs a diffusion generator's h view (--diffusion-view h)")
    components, _ = h_principal_components(G, count, seed=seed)
    return in_block(G, components.float())


def supervised(G, oracle, window, samples: int = 2048, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(6, d) unit directions, one per phantom factor, from a least-squares fit F ~ B z + c of the oracle's
    readings of G(z) on ``samples`` latents (their own seed stream, disjoint from those used for scoring).

    Returns the directions and what to report beside them: each factor's fit R2 on held-out latents (a factor
    the latent cannot move linearly shows as a low R2), B's condition number, and each direction's change of
    its factor per unit shift (in the factor's units)."""
    fitted = getattr(G, "fit_basis", lambda: None)()
    basis, scales = (None, None) if fitted is None else fitted
    directions, info = fit_directions(*fit_readings(G, oracle, window, samples, seed), samples, basis=basis,
                                      scales=scales)
    if basis is not None:
        info["within"] = f"the top {basis.shape[1]} principal components of h"
    return directions, dict(info, oracle_sha256=getattr(oracle, "sha256", None))


# Anterior tissue is undefined where no lung is in view (the abdomen: 10-13% of the demo generators' images); the
# images where a kept measurement is undefined are left out of the fit, so up to a quarter may be.
UNDEFINED_MAX = 0.25


def measurements(G, window, spacing: float, samples: int = 2048, seed: int = 0, min_r2: float | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """One unit direction per anatomy measurement that raises it and holds the others: ``supervised``'s fit with
    the measurements of G's images (their axial plane, in HU of ``window``, lengths in mm of ``spacing``) in place
    of the oracle's readings, on the fit's own latents. A measurement that is undefined (NaN: no body, no lungs)
    on more than UNDEFINED_MAX of the images, or that hardly varies (spread below ``anatomy.min_spread``, also on
    the images where the others are defined), is left out; so are those ``independent_measures`` drops. The fit
    then uses every image where the chosen ones are defined, each standardised by its spread on the fit rows
    (``spreads``; the directions' per-unit shifts are in them). A direction whose measurement the latent moves
    with a held-out fit R2 below ``min_r2`` is dropped (the default is the scorer's own line R2,
    latentct/score/scoring.py R2_MIN)."""
    from latentct.data.slices import unit_to_hu
    from latentct.score import anatomy
    from latentct.score.scoring import R2_MIN

    min_r2 = R2_MIN if min_r2 is None else min_r2

    if window is None:
        raise UserError("--method measurements: the generator declares no output_window (the HU of its output "
                        "range), so its images cannot be measured")
    z = fit_latents(G, samples, seed)
    measured = anatomy.measure(unit_to_hu(images_of(G, z)[:, :1], window), spacing)
    kept, left_out = [], {}
    for name, values in measured.items():
        finite = torch.isfinite(values)
        if (~finite).double().mean() > UNDEFINED_MAX:
            left_out[name] = f"undefined on {(~finite).double().mean():.0%} of the images"
        elif (spread := float(values[finite].double().std())) < anatomy.min_spread(name, spacing):
            left_out[name] = f"spread {spread:.3g} below {anatomy.min_spread(name, spacing):.3g}"
        else:
            kept.append(name)

    def none_vary():
        if not kept:
            raise UserError(f"--method measurements: no anatomy measurement varies on this generator's images "
                            f"({'; '.join(f'{k}: {v}' for k, v in left_out.items())})")

    none_vary()

    def table(names: list[str]) -> tuple:
        """The latents and standardised readings of the images where every one of ``names`` is defined, the fit
        rows first; the fit count; each reading's spread on the fit rows (what it is divided by)."""
        readings = torch.stack([measured[name].double() for name in names], 1)
        valid = torch.isfinite(readings).all(1)
        fit, test = int(valid[:samples].sum()), int(valid[samples:].sum())
        if fit < len(names) + 2 or test < 2:
            raise UserError(f"--method measurements: {fit} fit and {test} held-out images with {', '.join(names)} "
                            f"defined, of {samples} and {len(valid) - samples}; the fit needs {len(names) + 2} and 2 "
                            "(raise --supervised-samples)")
        spread = readings[valid][:fit].std(0)
        return z[valid], readings[valid] / spread.clamp_min(1e-12), fit, spread

    rows, readings, fit, spread = table(kept)
    flat = [name for name, s in zip(kept, spread) if s < anatomy.min_spread(name, spacing)]
    if flat:  # it varies only on images where another kept measurement is undefined
        left_out.update({name: "flat on the images where the others are defined" for name in flat})
        kept = [name for name in kept if name not in flat]
        none_vary()
        rows, readings, fit, spread = table(kept)
    _, first = fit_directions(rows, readings, fit, names=kept)
    chosen = independent_measures(rows[:fit], readings[:fit], kept, first["fit_r2"], min_r2, left_out)
    if not chosen:
        raise UserError(f"--method measurements: the latent moves no kept measurement linearly (held-out fit R2 "
                        f"{', '.join(f'{n} {r:.2f}' for n, r in first['fit_r2'].items())}, below {min_r2})")
    # the final fit on every image where the chosen ones are defined: one left out no longer drops images
    rows, readings, fit, spread = table(chosen)
    directions, info = fit_directions(rows, readings, fit, names=chosen)
    return directions, dict(info, measures=chosen, left_out=left_out, spacing_mm=spacing, supervision="measurements",
                            spreads={name: float(v) for name, v in zip(chosen, spread)}, images=fit)


# A measurement whose slopes lie within 30 degrees of the span of those already chosen (sine below 0.5) is one
# the others nearly determine (body area from width and thickness): holding them while raising it has no clean
# answer, and the least-norm inverse then pushes the others' directions into latent dimensions that draw nothing.
INDEPENDENT_SINE = 0.5


def independent_measures(z: torch.Tensor, readings: torch.Tensor, names: list[str], r2: dict, min_r2: float,
                         left_out: dict) -> list[str]:
    """The measurements the fit inverts: those the latent moves linearly (held-out ``r2`` >= ``min_r2``), taken
    most specific first (anatomy.PRIORITY, then R2), each kept only if its slopes (standardised readings per latent
    unit, by least squares on ``z``) are at least INDEPENDENT_SINE out of the span of those kept before it. Why
    each other one was left out goes into ``left_out``."""
    from latentct.score import anatomy

    design = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
    with single_threaded():
        slopes = torch.linalg.lstsq(design, readings.double()).solution[:-1].t()   # (measurements, d)
    chosen, basis = [], torch.zeros(z.shape[1], 0, dtype=torch.float64)
    for i in sorted(range(len(names)), key=lambda i: (-anatomy.PRIORITY[names[i]], -r2[names[i]])):
        name, row = names[i], slopes[i]
        if r2[name] < min_r2:
            left_out[name] = f"fit R2 {r2[name]:.2f} below {min_r2}"
            continue
        sine = float((row - basis @ (basis.t() @ row)).norm() / row.norm().clamp_min(1e-12))
        if sine < INDEPENDENT_SINE:
            left_out[name] = f"moves with {', '.join(chosen)} (sine {sine:.2f} to their span)"
            continue
        chosen.append(name)
        basis = torch.linalg.qr(torch.cat([basis, row[:, None]], 1)).Q
    return [name for name in names if name in chosen]


def fit_readings(G, oracle, window, samples: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` + ``samples // 2`` latents of the fit's own seed stream (never the rows the scorer draws) and
    the oracle's readings of their images: the first ``samples`` fit, the rest test."""
    z = fit_latents(G, samples, seed)
    return z, readings_of(G, oracle, window, z, paired=getattr(G, "view", None) == "h")


def fit_latents(G, samples: int, seed: int = 0) -> torch.Tensor:
    """``samples`` + ``samples // 2`` latents of the fit's own seed stream, never the rows the scorer draws: the
    supervised fit's and the metadata method's read-back's."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    if hasattr(G, "fit_latents"):  # a diffusion generator: dh drawn in h's principal components in the h view
        return G.fit_latents(samples + samples // 2, gen)
    return sample_latents(G, samples + samples // 2, gen, part="fit")


def images_of(G, z: torch.Tensor) -> torch.Tensor:
    """G's float32 images of the latents ``z`` on the CPU, generated 256 at a time on G's device."""
    device = next(G.parameters(), torch.zeros(0)).device
    with torch.no_grad():
        return torch.cat([G(part.to(device)).float().cpu() for part in z.split(256)])


def readings_of(G, oracle, window, z: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """The oracle's readings (N, F) of G's images of latents z, in float64. ``paired`` (a diffusion h view): each
    reading minus that of the same x_T with dh = 0, so what the starting noise draws (most of the spread between
    images) drops out of the fit and its slopes are less noisy (docs/diffusion.md; its R2 is then of the
    differences, not comparable with a raw one)."""
    from latentct.show.images import display

    def read(latents):
        return oracle.read(display(images_of(G, latents), window, oracle.window)).double()

    if not paired:
        return read(z)
    start, stop = G.direction_block
    plain = z.clone()
    plain[:, start:stop] = 0
    return read(z) - read(plain)


def fit_directions(z: torch.Tensor, readings: torch.Tensor, samples: int, basis: torch.Tensor | None = None,
                   names=None, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The least-squares map B from latents (or, with a (d, k) orthonormal ``basis``, from their coordinates in
    its span) to the readings (columns ``names``, default the phantom's factors); its pseudo-inverse's columns,
    mapped back to the latent, are the directions. Where the latent has more than half as many dimensions as
    there are fit samples (a diffusion model's x_T), B is a ridge regression instead (``ridge_penalty``).
    ``scales`` (one per basis column: the spread the latents were drawn with along it) fits on standardised
    coordinates, so the least-norm directions favour the columns that vary, not the noisy slopes of the ones that
    barely do (h's trailing principal components)."""
    from latentct.data.phantom import FACTORS
    from latentct.score.oracle import r_squared

    names = FACTORS if names is None else names

    x = z.double() if basis is None else z.double() @ basis.double()
    scales = None if scales is None else scales.double().clamp_min(1e-12)
    if scales is not None:
        x = x / scales
    fit_x, test_x = x[:samples], x[samples:]
    design = torch.cat([fit_x, torch.ones(len(fit_x), 1, dtype=torch.float64)], 1)
    penalty = ridge_penalty(fit_x, readings[:samples]) if fit_x.shape[1] >= samples / 2 else None
    with single_threaded():
        if penalty is None:
            coef = torch.linalg.lstsq(design, readings[:samples]).solution   # (p + 1, 6)
        else:
            coef = ridge(fit_x, readings[:samples], penalty)
        B = coef[:-1].t()                                                    # (6, p)
        pinv = torch.linalg.pinv(B)                                          # (p, 6)
        singular = torch.linalg.svdvals(B)
    test_pred = torch.cat([test_x, torch.ones(len(test_x), 1, dtype=torch.float64)], 1) @ coef
    fit_r2 = r_squared(test_pred, readings[samples:])
    unscaled = pinv if scales is None else pinv * scales[:, None]             # back to the basis' own units
    latent = unscaled if basis is None else basis.double() @ unscaled         # (d, 6)
    directions = latent.t() / latent.norm(dim=0).clamp_min(1e-12)[:, None]  # B v_f = e_f: each raises its factor
    if penalty is None:
        per_unit = (B @ (pinv / latent.norm(dim=0).clamp_min(1e-12))).diagonal()
    else:  # the ridge's B is shrunk: each direction's own slope, by least squares along it
        along = z[:samples].double() @ directions.t()
        along = along - along.mean(0)
        centred = readings[:samples] - readings[:samples].mean(0)
        per_unit = (along * centred).sum(0) / along.pow(2).sum(0).clamp_min(1e-12)
    info = {"fit_r2": {f: float(v) for f, v in zip(names, fit_r2)},
            "condition_number": float(singular.max() / singular.min().clamp_min(1e-12)),
            "per_unit_shift": {f: float(v) for f, v in zip(names, per_unit)}, "samples": samples,
            "solver": "least squares" if penalty is None else f"ridge, penalty {penalty:g} x samples"}
    return directions.float(), info


def ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """(p + 1, m) coefficients (intercept last) of the ridge regression y ~ x, penalty x n on the slopes only."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.t() @ xc + penalty * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    slopes = torch.linalg.solve(gram, xc.t() @ yc)
    return torch.cat([slopes, (mean_y - mean_x @ slopes)[None]])


def ridge_penalty(x: torch.Tensor, y: torch.Tensor, grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)) -> float:
    """The penalty (per sample) of the grid with the best mean R2 on the last quarter of the fit samples, fitted
    on the first three quarters (the fit's own held-out test rows stay untouched)."""
    from latentct.score.oracle import r_squared

    cut = len(x) * 3 // 4
    with single_threaded():
        scores = [float(r_squared(torch.cat([x[cut:], torch.ones(len(x) - cut, 1, dtype=x.dtype)], 1)
                                  @ ridge(x[:cut], y[:cut], p), y[cut:]).mean()) for p in grid]
    return grid[max(range(len(grid)), key=scores.__getitem__)]


def spectral(G, count: int, layer: str | None = None, samples: int = 64, seed: int = 0, iterations: int = 4,
             exact_up_to: int = 256) -> tuple[torch.Tensor, dict]:
    """(K, d) unit directions: the top eigenvectors of E_z[J^T J], J the Jacobian of an intermediate layer's
    output with respect to z (Khrulkov et al. 2021; for a linear first layer this is SeFa). Jacobian-vector
    products by forward-mode autodiff; up to ``exact_up_to`` latent dimensions the d x d matrix is formed
    exactly, above it a randomised subspace iteration with J^T J products (forward then reverse mode) finds the
    top ``count`` eigenvectors."""
    from latentct.generators.features import default_layer, layer_features
    from latentct.generators.interface import direction_block, in_block

    layer = default_layer(G) if layer is None else layer
    features = layer_features(G, layer)
    start, stop = direction_block(G)  # the Jacobian with respect to these coordinates (dh in a diffusion h view)
    d = stop - start
    gen = torch.Generator().manual_seed(seed * 7919 + 29)
    device = next(G.parameters(), torch.zeros(0)).device
    z = sample_latents(G, samples, gen).to(device)

    def full(tangents: torch.Tensor) -> torch.Tensor:  # (n, d) block tangents -> (n, latent_dim), on G's device
        return in_block(G, tangents.to(device))

    def jvp(points: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        import torch.autograd.forward_ad as fwAD

        with torch.no_grad(), fwAD.dual_level():
            tangent = fwAD.unpack_dual(features(fwAD.make_dual(points, tangents))).tangent
            tangent = None if tangent is None else tangent.double()
        if tangent is None:  # no derivative flowed: the layer's output is a constant of z
            raise UserError(f"--feature-layer: the output of {layer!r} does not depend on z; name a layer z reaches")
        return tangent

    def jtj(V: torch.Tensor) -> torch.Tensor:  # (d, p) -> E_z[J^T J V]
        p = V.shape[1]
        out = torch.zeros(d, p, dtype=torch.float64)
        for zi in z.split(max(1, 256 // p)):
            points = zi.repeat_interleave(p, 0)
            JV = jvp(points, full(V.t().float().repeat(len(zi), 1)))       # (n * p, m)
            x = points.clone().requires_grad_(True)
            with torch.enable_grad():
                y = features(x).double()
                grads, = torch.autograd.grad(y, x, grad_outputs=JV)        # rows: J_i^T (J_i v)
            out += grads[:, start:stop].double().cpu().reshape(len(zi), p, d).sum(0).t()
        return out / len(z)

    count = min(count, d)
    with single_threaded():
        if d <= exact_up_to:
            M = torch.zeros(d, d, dtype=torch.float64)
            eye = torch.eye(d)
            for zi in z.split(max(1, 2048 // d)):
                J = jvp(zi.repeat_interleave(d, 0), full(eye.repeat(len(zi), 1))).reshape(len(zi), d, -1)
                M += torch.einsum("nim,njm->ij", J, J).cpu()
            values, vectors = torch.linalg.eigh(M / len(z))
            order = torch.argsort(values, descending=True)[:count]
            top, top_values = vectors[:, order].t(), values[order]
        else:
            Q = torch.linalg.qr(torch.randn(d, count + 8, generator=gen, dtype=torch.float64))[0]
            for _ in range(iterations):
                Q = torch.linalg.qr(jtj(Q))[0]
            small = Q.t() @ jtj(Q)
            values, vectors = torch.linalg.eigh((small + small.t()) / 2)
            order = torch.argsort(values, descending=True)[:count]
            top, top_values = (Q @ vectors[:, order]).t(), values[order]
    info = {"layer": layer or "output", "samples": samples, "eigenvalues": top_values.tolist(),
            "solver": "exact" if d <= exact_up_to else f"subspace iteration x{iterations}"}
    top = fix_signs(torch.nn.functional.normalize(top, dim=1)).float()
    return full(top).cpu().contiguous(), info
