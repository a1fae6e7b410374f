"""Directions from what every CT series carries for free: which patient a slice belongs to and where it sits.

No factor label, oracle or anatomy measurement enters, only the DICOM metadata that preprocessing keeps
(``series_uid``, ``patient_id``, ``z_mm``) and real slices encoded into the latent (the VAE's encoder, or the
DCGAN's embedding). The grouping makes the factors identifiable where the prior alone does not: pairs that share
some factors (Locatello et al., ICML 2020) and an auxiliary variable such as the patient (Hyvärinen, Sasaki &
Turner, AISTATS 2019).

- The slice-position direction: within each series only the slice moves, so the pooled within-series slope of
  the codes on z_mm is how the latent follows the slice position.
- The patient-level subspace: the series' mean codes, with the slice's line taken out first (series that cover
  different slice ranges would otherwise carry it), vary between patients and hold within a series; their top
  principal components, unmixed by FastICA, give directions that each move one patient-level property
  (``--metadata-unmix ica``). FastICA needs non-Gaussian sources, and many patient properties are close to
  Gaussian (sizes, positions); so by default (``conditional``) the slice direction is kept as it is and the span of
  it and the patient-level subspace is cut by latentct/discover/unmix.py's conditional steering walks and content
  directions (``cut_by_steering``): the metadata finds the subspace, label-free steering its basis.

Tables mark the method "uses patient and slice position" and never rank it among the label-free methods.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from latentct.discover.baselines import fix_signs, single_threaded
from latentct.util.settings import UserError

METADATA_UNMIX = ("ica", "conditional")  # how the patient-level subspace is cut into directions


def series_groups(index: list[dict]) -> dict[str, list[int]]:
    """Row numbers of the index by series."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(index):
        groups[row["series_uid"]].append(i)
    return dict(groups)


def slice_direction(codes: torch.Tensor, z_mm: torch.Tensor, groups: dict[str, list[int]]) -> tuple[torch.Tensor, dict]:
    """(d,) unit direction: the pooled within-series least-squares slope of the codes on the slice position, and
    the share of the within-series code variance the line explains."""
    num = torch.zeros(codes.shape[1], dtype=torch.float64)
    den, total, explained = 0.0, 0.0, 0.0
    for rows in groups.values():
        if len(rows) < 2:
            continue
        c, z = codes[rows].double(), z_mm[rows].double()
        dc, dz = c - c.mean(0), z - z.mean()
        num += dz @ dc
        den += float(dz @ dz)
        total += float((dc ** 2).sum())
    if den <= 0:
        raise UserError("the metadata method: no series has two slices at different positions")
    slope = num / den                                      # code change per mm
    for rows in groups.values():
        if len(rows) >= 2:
            dz = z_mm[rows].double() - z_mm[rows].double().mean()
            explained += float((dz[:, None] * slope[None]).pow(2).sum())
    return slope / slope.norm().clamp_min(1e-12), {"mm_per_unit": float(1 / slope.norm().clamp_min(1e-12)),
                                                   "within_series_share": explained / max(total, 1e-12)}


def patient_directions(codes: torch.Tensor, groups: dict[str, list[int]], count: int,
                       seed: int = 0) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(count, d) unit directions: FastICA of the series' mean codes in their top ``count`` principal
    components; each direction is a mixing column, the latent change that moves one source. Also the mixing
    columns themselves (count, d), in the same order: the code change per unit source."""
    from sklearn.decomposition import FastICA

    means = torch.stack([codes[rows].double().mean(0) for rows in groups.values()]).numpy()
    count = min(count, len(means) - 1, codes.shape[1])
    if count < 1:
        raise UserError(f"the metadata method: {len(means)} series are too few for a patient-level subspace")
    with single_threaded():
        model = FastICA(count, whiten="unit-variance", max_iter=10000, random_state=seed)
        sources = model.fit_transform(means)
    mixing = torch.from_numpy(model.mixing_.T.copy())     # (count, d): code change per unit source
    order = torch.argsort(mixing.norm(dim=1), descending=True)
    between = means - means.mean(0)
    return torch.nn.functional.normalize(mixing[order], dim=1), {
        "series": len(means), "sources_kurtosis": [round(float(k), 3) for k in
                                                   ((sources ** 4).mean(0) - 3)[order.numpy()]],
        "between_series_variance": float((between ** 2).sum() / max(len(means) - 1, 1))}, mixing[order]


def metadata_directions(codes: torch.Tensor, index: list[dict], count: int, seed: int = 0):
    """(1 + count', d) directions in the codes' space: the slice-position direction first, then the patient-level
    ones; what to report beside them; and a function from codes (N, d) to readings (N, 1 + count'), one per
    direction: each code's coordinates, by least squares, in the basis of the slice's line and the patient
    sources' code changes (for ``read_back``)."""
    if not index or any(key not in index[0] for key in ("series_uid", "z_mm")):
        raise UserError("the metadata method needs series_uid and z_mm in the dataset's index (preprocess.py keeps them)")
    groups = series_groups(index)
    z_mm = torch.tensor([float(row["z_mm"]) for row in index], dtype=torch.float64)
    position, pos_info = slice_direction(codes, z_mm, groups)
    # series that cover different slice ranges would carry the slice into their means: take its line out first
    slope = position.double() / pos_info["mm_per_unit"]
    held = codes.double() - (z_mm - z_mm.mean())[:, None] * slope[None]
    patients, pat_info, mixing = patient_directions(held, groups, count - 1, seed)
    directions = fix_signs(torch.cat([position[None], patients]).float())
    info = {"supervision": "metadata", "slice_position": pos_info, "patient_level": pat_info, "slices": len(index),
            "patients": len({row.get("patient_id") for row in index})}

    # The readings: a code's coordinates in the basis of the mixing columns (the slice's line, then the patient
    # sources' code changes), by least squares; on a code that only the slice and the sources move they are those
    # values, each untouched by the others (the slice's projection alone would carry the sources it is not
    # orthogonal to).
    unmixing = torch.linalg.pinv(torch.cat([position[None].double(), mixing]).t())   # (1 + count', d)
    centre = codes.double().mean(0)

    def read(c: torch.Tensor) -> torch.Tensor:
        return (c.double() - centre) @ unmixing.t()

    return directions, info, read


def read_back(G, encoder, read, samples: int = 2048, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The metadata directions moved from the encoder's code space into the generator's latent: each reading of
    ``read`` (the slice coordinate, the patient-level sources), taken on the encoder's codes of G(z) over prior
    latents, is fitted by least squares on z, and each direction raises its reading while holding the others
    (the supervised method's fit, latentct/discover/baselines.py:fit_directions, with the metadata readings in
    place of the oracle's). Where E(G(z)) is not z (an imperfect autoencoder: the code change a property makes in
    real slices is T v for the latent direction v that makes it), the mixing columns are T v; this returns v."""
    from latentct.discover.baselines import fit_directions, fit_latents

    device = next(G.parameters(), torch.zeros(0)).device
    z = fit_latents(G, samples, seed)
    with torch.no_grad():
        codes = torch.cat([encoder(G(part.to(device)))[0].double().cpu() for part in z.split(256)])
    readings = read(codes)
    names = ["slice", *(f"patient {i}" for i in range(1, readings.shape[1]))]
    directions, info = fit_directions(z, readings, samples, names=names)
    return fix_signs(directions), {"read_back": {"samples": samples, "fit_r2": info["fit_r2"],
                                                 "condition_number": info["condition_number"]}}


def span_room(series: int, patient_directions: int, latent_dim: int) -> None:
    """Refuse in one line a metadata span too small for the conditional steering walks (six edits and room for
    content: 8): the slice direction and min(--patient-directions, series - 1) patient-level ones, at most the
    latent's dimension."""
    size = min(1 + min(patient_directions, series - 1), latent_dim)
    if size < 8:
        raise UserError(f"--metadata-unmix conditional: the metadata span would hold {size} directions (the slice and "
                        f"min(--patient-directions {patient_directions}, {series} series - 1) patient-level ones, in a "
                        f"{latent_dim}-dimensional latent); the steering walks need 8: more series or "
                        "--patient-directions, or --metadata-unmix ica")


def cut_by_steering(G, directions: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The metadata's (1 + p, d) latent directions, the slice position's first, cut by by_steer's conditional walks
    and content directions inside their span, the slice direction kept as it is (the first row: the metadata
    measured it; conditioned on the walks it would lose the change in body shape that comes with the slice level,
    and with it the slice). It counts among the content rows' places (up to 8 rows in all). Returns the directions
    and by_steer's account of them."""
    from latentct.discover.unmix import by_steer

    if min(directions.shape) < 8:
        raise UserError(f"--metadata-unmix conditional: the metadata span holds {min(directions.shape)} directions, "
                        "the steering walks need 8: more series or --patient-directions, or --metadata-unmix ica")
    return by_steer(G, directions, seed=seed, conditional=True, known=directions[:1])


def encode_dataset(G, folder: str, window, encoder=None, limit: int | None = None, embed_steps: int = 200,
                   seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """The training split's slices encoded into the latent (the encoder's mean, else optimised z) and their
    index rows; with ``limit``, whole series drawn at random until about that many slices."""
    from latentct.data.slices import CTSlices, read_index
    from latentct.generators.embed import embed

    slices = CTSlices(folder, "train", window=window)
    index = read_index(folder, "train")
    rows = list(range(len(index)))
    if limit is not None and limit < len(rows):
        groups = list(series_groups(index).values())
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = []
        for g in order:
            if len(rows) >= limit:
                break
            rows += groups[g]
        rows.sort()
    codes = []
    for start in range(0, len(rows), 256):
        x = torch.stack([slices[i] for i in rows[start:start + 256]])
        with torch.no_grad():
            if encoder is not None:
                codes.append(encoder(x)[0].double())
                continue
        desc = f"embedding slices {start + 1}-{start + len(x)} of {len(rows)}"
        codes.append(embed(G, x, steps=embed_steps, seed=seed, desc=desc)[0].double())
    return torch.cat(codes), [index[i] for i in rows]

