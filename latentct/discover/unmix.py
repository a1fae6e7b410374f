"""Unmixing a span: a non-orthogonal basis inside the top-m directions of an orthogonal method (SeFa, spectral).

Orthogonal methods can find the span the factors move in and still cut it along the wrong axes: where the
generator's factor directions are not orthogonal, no orthogonal basis is made of them. Three label-free ways to
find directions inside the span that need not be orthogonal:

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

- ``steer``: the span directions whose image change best reproduces six affine edits of the image (shift, scale
  and rotation of the body: patient position, body size and roll on CT), fitted by least squares over latents of
  the prior (Jahanian et al.'s steerability walks, linearised), plus up to ``content`` + 1 directions for the
  change no edit explains, unmixed inside that change's subspace by joint diagonalisation as ``ajd`` does. It asks
  nothing of the factors' statistics, only that some of them move the image as a whole; the edits are generic image
  motions, not anatomy measurements, and no label or oracle enters.
- ``conditional``: the steering walks and content directions, each conditioned on the others (InterFaceGAN's
  conditional manipulation, in the span's pullback metric): the smallest image change that performs one edit
  and no other edit or content change (``condition``).

``ajd`` and ``ica`` return (m, d) unit latent directions: ``ajd``'s ordered by how much they move the image,
``ica``'s by the latent change per unit source; ``steer`` and ``conditional`` return up to 6 + ``content``, the
walks that reproduce their edit first, then the content directions, none a repeat of another.
"""
from __future__ import annotations

import numpy as np
import torch

from latentct.discover.baselines import baseline_matrix, fix_signs, single_threaded
from latentct.generators.interface import direction_block, sample_latents
from latentct.util.settings import UserError

UNMIX_BY = ("ajd", "ica", "steer", "conditional")
EDITS = ("shift x", "shift y", "scale x", "scale y", "rotation", "shear")  # by_steer's image edits
REPEAT = 0.9  # by_steer: a candidate direction this close (|cosine|) to one already taken is a repeat
WHOLE_LATENT = 128  # --unmix-from latent: the largest direction block taken whole as the span
WEAK_WALK = 0.1  # by_steer: a walk reproducing less than this of the best walk's share comes after the content


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


def span_jacobians(G, basis: torch.Tensor, z: torch.Tensor, chunk: int = 256):
    """(n, m, *image) chunks of the image's Jacobian at the latents ``z`` with respect to the span's coordinates,
    by forward-mode products along the m basis rows (never a full Jacobian in the latent)."""
    import torch.autograd.forward_ad as fwAD

    m = len(basis)
    device = next(G.parameters(), torch.zeros(0)).device
    tangents = basis.float().to(device)
    per = max(1, chunk // m)
    for zi in z.to(device).split(per):
        points = zi.repeat_interleave(m, 0)
        with torch.no_grad(), fwAD.dual_level():
            image = G(fwAD.make_dual(points, tangents.repeat(len(zi), 1)))
            J = fwAD.unpack_dual(image).tangent
        if J is None:
            raise UserError("unmixing: the generator's output does not depend on z through forward mode")
        yield J.double().cpu().reshape(len(zi), m, *J.shape[1:])


def pullback_metrics(G, basis: torch.Tensor, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N, m, m) metrics J^T J of the images at the latents ``z`` in the span's coordinates."""
    out = []
    for J in span_jacobians(G, basis, z, chunk):
        J = J.flatten(2)
        out.append(J @ J.transpose(1, 2))
    return torch.cat(out)


def joint_diagonaliser(metrics: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Pham's (2000) approximate joint diagonaliser V (rows: the filters, V C V^T near diagonal; pyriemann's
    ``ajd_pham``, no orthogonality constraint) of the (N, q, q) ``metrics``, brought to a common scale and made
    positive definite first; also the diagonalised matrices and the scaled metrics."""
    from pyriemann.geometry.ajd import ajd_pham

    q = metrics.shape[-1]
    scale = metrics.diagonal(dim1=1, dim2=2).mean()
    metrics = metrics / scale + 1e-6 * torch.eye(q, dtype=torch.float64)  # SPD, on a common scale
    with single_threaded():
        V, D = ajd_pham(metrics.numpy(), eps=1e-8, n_iter_max=500)
    return torch.from_numpy(np.ascontiguousarray(V)), D, metrics


def by_ajd(G, rows: torch.Tensor, latents: int | None = None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Rows of the approximate joint diagonaliser of the pullback metrics at ``latents`` (default 8 m) latents."""
    basis = orthonormal_rows(rows)
    m = len(basis)
    latents = latents or 8 * m
    if latents < 4 * m:
        raise UserError(f"--unmix-latents: the joint diagonalisation needs at least 4 m = {4 * m} latents")
    z, _ = span_coordinates(G, basis, latents, seed)
    V, D, metrics = joint_diagonaliser(pullback_metrics(G, basis, z))
    offdiag = np.abs(D - np.einsum("nii->ni", D)[:, :, None] * np.eye(m)).sum() / np.abs(D).sum()
    directions = V @ basis                                               # (m, d)
    directions = torch.nn.functional.normalize(directions, dim=1)
    moved = torch.einsum("ij,njk,ik->i", directions @ basis.t(), metrics, directions @ basis.t())
    order = torch.argsort(moved, descending=True)
    return fix_signs(directions[order]).float(), {"unmix_by": "ajd", "latents": latents,
                                                  "off_diagonal": round(float(offdiag), 4)}


def unmix(G, rows: torch.Tensor, by: str = "ajd", features: str = "layer", samples: int = 2048,
          seed: int = 0, encoder=None, content: int = 2) -> tuple[torch.Tensor, dict]:
    """Directions inside the span of the (m, d) ``rows``: m by ``ajd`` or ``ica`` (``encoder``: a VAE's, for
    ``features="encoder"``), up to 6 + ``content`` by ``steer`` and ``conditional``."""
    if by == "ajd":
        return by_ajd(G, rows, seed=seed)
    if by == "ica":
        return by_ica(G, rows, features, samples, seed, encoder)
    if by in ("steer", "conditional"):
        return by_steer(G, rows, content=content, seed=seed, conditional=by == "conditional")
    raise UserError(f"--unmix-by: {by!r} is not one of {', '.join(UNMIX_BY)}")


def whole_latent(G, flag: str = "--unmix-from latent",
                 instead: str = "pass an orthogonal method's directions.pt instead") -> torch.Tensor:
    """The span ``--unmix-from latent`` unmixes: every axis of G's direction block (all of z, or dh in a diffusion
    h view), at most WHOLE_LATENT of them (the walks take one Jacobian column per axis and latent); a larger block
    is a one-line error naming ``flag`` and what to do ``instead``."""
    start, stop = direction_block(G)
    if stop - start > WHOLE_LATENT:
        raise UserError(f"{flag}: the latent has {stop - start} dimensions, more than the {WHOLE_LATENT} the walks "
                        f"take; {instead}")
    return baseline_matrix("coordinate", G, stop - start)


def image_flows(images: torch.Tensor) -> torch.Tensor:
    """(N, 6, pixels): the first-order image change of each of EDITS, applied to each (N, C, H, W) image about its
    body's centroid (the pixels above 30% of the image's intensity range), by the chain rule from the image's
    gradient: an edit that moves each point by u(x, y) changes the image by -grad(I) . u; the sign is immaterial."""
    I = images.double()
    N, C, H, W = I.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, dtype=torch.float64),
                            torch.linspace(-1, 1, W, dtype=torch.float64), indexing="ij")
    gy, gx = torch.gradient(I, dim=(2, 3))
    mean = I.mean(1)
    lo, hi = mean.amin((1, 2), keepdim=True), mean.amax((1, 2), keepdim=True)
    body = (mean > lo + 0.3 * (hi - lo)).double()
    count = body.sum((1, 2)).clamp_min(1)
    x = (xx - ((body * xx).sum((1, 2)) / count)[:, None, None])[:, None]   # (N, 1, H, W) about the centroid
    y = (yy - ((body * yy).sum((1, 2)) / count)[:, None, None])[:, None]
    return torch.stack([gx, gy, x * gx, y * gy, -y * gx + x * gy, y * gx + x * gy], 1).reshape(N, 6, -1)


def by_steer(G, rows: torch.Tensor, latents: int = 64, content: int = 2, seed: int = 0,
             conditional: bool = False, known: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Linearised steerability walks inside the span: for each of EDITS, the span direction w whose image change
    best reproduces that edit of G(z) over ``latents`` latents of the prior, min_w sum_z ||J(z) w - edit(G(z))||^2
    (Jahanian, Chai & Isola, ICLR 2020, ali-design/gan_steerability: a linear walk trained with an L2 loss against
    shiftx / shifty / zoom / rotate2d edits of G(z) by alpha, with SGD and a mask for what leaves the frame; to
    first order in alpha the loss is this least-squares problem, solved in closed form as Spingarn, Banner &
    Michaeli, ICLR 2021, do for a GAN's first layer, and an infinitesimal edit leaves nothing out of frame to mask;
    the edits here are about the body's centroid, not the frame's centre).

    Then directions for what no edit explains. The image change left after each latent's least-squares projection
    on the edits spans, in its top ``content`` + 1 generalised eigenvectors against the whole change, a subspace of
    such changes; inside it the approximate joint diagonaliser of every latent's residual metric (Pham 2000, as
    ``by_ajd``) gives directions whose leftover image changes stay apart at each latent (two properties that change
    different parts of the body, such as the slice level and breast size), not an orthogonal cut of the subspace.
    Those whose change the edits leave mostly unexplained (share > 1/2) are the content rows, taken by that share,
    before any walk that reproduces under WEAK_WALK of what the best walk does (no direction of the span performs
    that edit, and its walk is arbitrary: it could take a content direction's place as its repeat).

    ``conditional``: each walk, and each content direction, is then conditioned on the others, as InterFaceGAN's
    conditional manipulation makes an attribute's direction orthogonal to the other attributes' boundaries (Shen et
    al., CVPR 2020, genforce/interfacegan ``project_boundary``, which takes up to two), here in the span's pullback
    metric and for any number of conditions: every span coordinate's image change is decomposed by least squares,
    pooled over the latents, into the edits' flows and the content directions' leftover changes (a (t, m) map M),
    and the direction for template k is the smallest image change that does k and none of the others, M^+ e_k. The
    conditions are the walks reproducing at least WEAK_WALK of the best (one of each set of repeats) and the content
    rows; a condition no direction can meet beside the others is dropped and the rest solved again (``condition``).
    An independent walk takes whatever part of another change helps it match its edit's flow (the toy in the
    tests: a table whose brightness varies, taken into the vertical-shift walk); conditioned, it may not. Where one
    factor performs two edits together (a body that grows in both axes), conditioning them on each other costs
    that factor some of its direction.

    ``known``: (g, d) latent directions inside the span that are known already (the metadata method's slice
    position, latentct/discover/metadata.py): returned first as they are ("given"), neither conditioned nor
    conditioning the others, and any other row that repeats one is left out.

    Returns up to 6 + content unit directions (no two closer than REPEAT, none for a walk that moves nothing),
    with what each row is (``rows``: "given", an edit or "content", up to ``content`` + 1 of these), per edit in
    EDITS order the share of it its walk reproduces (``reproduced``), and per given and content row the share of
    its image change no edit explains (``content_share``)."""
    basis = orthonormal_rows(rows)
    m = len(basis)
    if m < 6 + content:
        raise UserError(f"--unmix-from / --unmix-size / --unmix-content: the steering walks need a span of at least "
                        f"{6 + content} directions (six edits and {content} content), got {m} (the whole latent's "
                        "size, or the smaller of --unmix-size and the --unmix-from file's direction count)")
    z, _ = span_coordinates(G, basis, latents, seed)
    flows, J = flows_and_changes(G, basis, z)                                    # (N, 6, P), (N, m, P)
    metric = torch.einsum("nip,njp->ij", J, J)
    value, vector = torch.linalg.eigh(metric)                  # whiten inside the part of the span that moves the image
    moves = value > 1e-9 * value.max()
    if value.max() <= 0 or not moves.any():
        raise UserError("--unmix-from: no direction of the span changes the generated images")
    white = vector[:, moves] / value[moves].sqrt()                                # (m, r)
    target = torch.einsum("nip,nkp->ki", J, flows)                               # (6, m)
    walks = target @ white @ white.t()                                           # (6, m) least-squares walks
    reproduced = (walks * target).sum(1) / (flows ** 2).sum((0, 2))
    rest = edit_residual(flows, J)                                               # change no edit explains
    share, inner = torch.linalg.eigh(white.t() @ torch.einsum("nip,njp->ij", rest, rest) @ white)
    sub = white @ inner[:, torch.argsort(share, descending=True)[:min(content + 1, white.shape[1])]]  # (m, q)
    leftover = torch.einsum("nip,iq->nqp", rest, sub)
    V, _, _ = joint_diagonaliser(leftover @ leftover.transpose(1, 2))
    candidates = V @ sub.t()                                                     # (q, m) content directions
    unexplained = unexplained_share(J, rest, candidates)
    order = [k for k in torch.argsort(unexplained, descending=True).tolist() if unexplained[k] > 0.5]
    candidates, unexplained = candidates[order], unexplained[order]              # mostly unexplained, least first
    # Walks for edits no factor performs are arbitrary and can repeat another row, even a content direction: take
    # the walks that reproduce at least WEAK_WALK of what the best walk does (by how much), then the content
    # directions, then the other walks, each only if it is no repeat (|cos| < REPEAT) of one taken, until 6 + content.
    order = torch.argsort(reproduced, descending=True).tolist()
    strong = [k for k in order if reproduced[k] >= WEAK_WALK * reproduced.max()]
    if conditional:  # the conditions: the strong walks that repeat no better one, and the content
        unit = torch.nn.functional.normalize(walks @ basis, dim=1)
        distinct = [k for i, k in enumerate(strong) if all(abs(float(unit[k] @ unit[j])) < REPEAT for j in strong[:i])]
        walks, candidates = condition(J, flows, rest, white, metric, target, walks, candidates, distinct)
        unexplained = unexplained_share(J, rest, candidates)
        reproduced = reproduction(walks, target, metric, (flows ** 2).sum((0, 2)))  # what the kept walks reproduce
    given = []
    if known is not None:
        coords = known.double() @ basis.t()                                      # (g, m) in the span's coordinates
        given = [(c, "given", float(u)) for c, u in zip(coords, unexplained_share(J, rest, coords))]
    rows, labels, kept_share = [], [], []
    for coords, label, part in given + [(walks[k], EDITS[k], None) for k in strong] + [
            (c, "content", float(u)) for c, u in zip(candidates, unexplained)] + [
            (walks[k], EDITS[k], None) for k in order if k not in strong]:
        direction = torch.nn.functional.normalize(coords @ basis, dim=0)
        if len(rows) == 6 + content:
            break
        if direction.norm() < 0.5:                                   # a walk that moves nothing (a zero vector)
            continue
        if rows and (torch.stack(rows) @ direction).abs().max() >= REPEAT:
            continue
        rows.append(direction)
        labels.append(label)
        kept_share += [round(part, 4)] if part is not None else []
    directions = torch.stack(rows)
    return fix_signs(directions).float(), {
        "unmix_by": "conditional" if conditional else "steer", "latents": latents, "rows": labels,
        "reproduced": [round(float(r), 4) for r in reproduced],
        "content_share": kept_share}


def flows_and_changes(G, basis: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At the latents ``z``: (N, 6, P) the flows of EDITS on G(z) and (N, m, P) the image's first-order change
    along each of the (m, d) ``basis`` rows."""
    with torch.no_grad():
        flows = torch.cat([image_flows(G(part)) for part in z.split(64)])
    return flows, torch.cat([j.flatten(2) for j in span_jacobians(G, basis, z)])


def edit_residual(flows: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """(N, m, P) image changes ``J`` less their least-squares fit, at each latent, on the (N, 6, P) edit ``flows``:
    the change no edit explains (a flat image has no flows, and then nothing is explained)."""
    gram_inverse = torch.linalg.pinv(flows @ flows.transpose(1, 2), hermitian=True)
    coef = torch.einsum("nkp,nip->nki", gram_inverse @ flows, J)
    return J - torch.einsum("nkp,nki->nip", flows, coef)


def unexplained_share(J, rest, directions):
    """Per (k, m) span direction: the share of its image change (``J``) that no edit explains (``rest``)."""
    return (torch.einsum("nip,ki->nkp", rest, directions).square().sum((0, 2))
            / torch.einsum("nip,ki->nkp", J, directions).square().sum((0, 2)).clamp_min(1e-30))


def reproduction(walks, target, metric, power):
    """Per (k, m) walk: the share of its edit's flow (``power``, its squared norm; ``target``, the flow's inner
    products with each span coordinate's change) that its image change reproduces at the best scale. For a
    least-squares walk it is by_steer's ``reproduced``."""
    return (walks * target).sum(1) ** 2 / (torch.einsum("ki,ij,kj->k", walks, metric, walks).clamp_min(1e-30) * power)


def condition(J, flows, rest, white, metric, target, walks, candidates, strong):
    """by_steer's conditional directions: the (6, m) walks of the ``strong`` edits and the (c, m) content
    ``candidates`` replaced by M^+ e_k in the span's pullback metric (``metric``; ``white`` whitens it, ``target``
    holds the flows' inner products with J), M the pooled least-squares decomposition of each span coordinate's
    image change (``J``, (N, m, P)) into the strong edits' ``flows`` and the candidates' leftover changes (of
    ``rest``, the change no edit explains).

    A condition no direction of the span can meet beside the others (two edits that one factor performs together,
    or more conditions than the span has room for) has no small solution: what solves it is whatever barely moves
    the image, or it is met only in part. So a condition is dropped, the worst first, and the rest solved again,
    while any of them fails: a conditioned walk must reproduce at least half of what its independent walk does, a
    conditioned content direction must stay mostly unexplained by the edits, and each must do at least 0.9 of its
    own template (M w = e_k met). What was dropped keeps its independent direction and conditions nothing."""
    contents = torch.einsum("nip,ki->nkp", rest, candidates)                     # (N, c, P)
    templates = torch.cat([flows[:, strong], contents], 1)                       # (N, t, P)
    power = (flows ** 2).sum((0, 2))
    before = reproduction(walks[strong], target[strong], metric, power[strong])  # the independent walks'
    active = list(range(templates.shape[1]))
    while active:
        T = templates[:, active]
        M = (torch.linalg.pinv(torch.einsum("nkp,nlp->kl", T, T), hermitian=True)
             @ torch.einsum("nkp,nip->ki", T, J))                                # (a, m)
        alone = (white @ torch.linalg.pinv(M @ white)).t()                       # (a, m): template alone
        met = (M * alone).sum(1) / 0.9
        kept = torch.stack([reproduction(alone[i:i + 1], target[[strong[j]]], metric, power[[strong[j]]])[0]
                            / (0.5 * before[j]) if j < len(strong) else unexplained_share(J, rest, alone[i:i + 1])[0] / 0.5
                            for i, j in enumerate(active)])
        margin = torch.minimum(met, kept)
        if margin.min() >= 1:
            break
        active.pop(int(margin.argmin()))
    walks, candidates = walks.clone(), candidates.clone()
    for i, j in enumerate(active):
        if j < len(strong):
            walks[strong[j]] = alone[i]
        else:
            candidates[j - len(strong)] = alone[i]
    return walks, candidates
