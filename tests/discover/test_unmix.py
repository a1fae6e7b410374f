"""Label-free methods that can return non-orthogonal directions: unmixing a span (latentct/discover/unmix.py) and
GANSpace's ICA and sparse PCA (latentct/discover/baselines.py), on a toy whose factor directions are not
orthogonal, where the orthogonal methods (spectral, PCA) cannot return them."""
import json

import pytest
import torch
import torch.nn as nn

from latentct.discover.baselines import ica, pca, sparse_pca, spectral
from latentct.discover.unmix import by_ajd, by_ica, pullback_metrics


class MixedSquares(nn.Module):
    """32 x 32 images of three squares whose brightness follows three independent uniform sources s. Its latents
    (an encoded-latents prior, as a VAE's) are z = M s + faint noise, with M's three unit columns 50-65 degrees
    apart: moving z along column f changes square f alone, and no orthogonal basis holds the three columns."""

    latent_dim = 6

    def __init__(self):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))
        mix = torch.tensor([[1.0, 0.0, 0.0], [0.55, 0.835, 0.0], [0.35, 0.3, 0.887]])  # rows: unit, non-orthogonal
        M = (mix @ q[:3]).t()                                            # (6, 3) columns: the factor directions
        self.register_buffer("M", M)
        self.register_buffer("unmix", torch.linalg.pinv(M))               # (3, 6): s = unmix z
        gen = torch.Generator().manual_seed(4)
        s = (torch.rand(4096, 3, generator=gen) * 2 - 1) * 3 ** 0.5
        self.register_buffer("prior", s @ M.t() + 0.02 * torch.randn(4096, 6, generator=gen))
        self.first = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(self.unmix)
        self.act = nn.Tanh()

    def forward(self, z):
        b = self.act(0.6 * self.first(z))                                # (N, 3) brightness of each square
        img = -torch.ones(len(z), 1, 32, 32)
        for f, (r, c) in enumerate(((4, 4), (4, 20), (20, 12))):
            img[:, 0, r:r + 9, c:c + 9] = b[:, f].view(-1, 1, 1)
        return img


def best_cosines(found: torch.Tensor, planted: torch.Tensor) -> torch.Tensor:
    """For each planted (d,) column, the largest |cosine| with any found row."""
    return (torch.nn.functional.normalize(found.double(), dim=1) @ torch.nn.functional.normalize(
        planted.double(), dim=0)).abs().max(0).values


@pytest.fixture(scope="module")
def toy():
    return MixedSquares().eval().requires_grad_(False)


def test_orthogonal_methods_cannot_return_non_orthogonal_factor_directions(toy):
    sp, _ = spectral(toy, 3, layer="act", samples=64)
    assert best_cosines(sp, toy.M).min() < 0.95
    assert best_cosines(pca(toy, 3), toy.M).min() < 0.95


@pytest.mark.parametrize("unmixer", ["ajd", "ica"])
def test_unmixing_the_span_finds_each_planted_direction(toy, unmixer):
    rows, _ = spectral(toy, 3, layer="act", samples=64)
    found, info = by_ajd(toy, rows) if unmixer == "ajd" else by_ica(toy, rows, features="image", samples=2048)
    assert found.shape == (3, 6) and torch.allclose(found.norm(dim=1), torch.ones(3), atol=1e-5)
    assert best_cosines(found, toy.M).min() > 0.97, best_cosines(found, toy.M)
    if unmixer == "ica":
        assert info["linearity"] > 0.9 and info["features"] == "image"
    else:
        assert info["latents"] == 24 and info["off_diagonal"] < 0.05


def test_pullback_metrics_are_the_jacobians_products(toy):
    basis = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].t()
    z = toy.prior[:3]
    metrics = pullback_metrics(toy, basis, z)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda c: toy(z[i:i + 1] + (c.float() @ basis.float())).flatten(),
                                               torch.zeros(1, 2, dtype=torch.float64)).reshape(-1, 2).double()
        assert torch.allclose(metrics[i], J.t() @ J, atol=1e-4)


def test_unmixing_refuses_too_few_latents(toy):
    from latentct.util.settings import UserError

    with pytest.raises(UserError, match="at least 4 m"):
        by_ajd(toy, toy.M.t(), latents=8)


def test_ganspace_ica_and_sparse_pca_read_a_nonlinear_layer(toy):
    found, info = ica(toy, 3, layer="act", samples=2048)
    assert info["layer"] == "act" and best_cosines(found, toy.M).min() > 0.97
    sparse, info = sparse_pca(toy, 3, layer="act", samples=512, alpha=0.1)
    assert sparse.shape == (3, 6) and info["iterations"] >= 1 and best_cosines(sparse, toy.M).min() > 0.9


@pytest.fixture
def mixed_file(tmp_path, monkeypatch):
    from latentct.generators import interface as generators
    from latentct.generators.interface import save_generator

    monkeypatch.setitem(generators.KINDS, "mixedsquares", MixedSquares)
    path = tmp_path / "mixed.pt"
    save_generator(path, "mixedsquares", MixedSquares(), {}, "default", "")
    return path


def _run(toy_file, out, *extra):
    from latentct.util.settings import parse_settings
    from Training import TrainDirections

    cfg = parse_settings(TrainDirections.Settings, ["--generator", str(toy_file), "--output", str(out), "--device",
                                                    "cpu", "--log-every", "1", "--sample-every", "1000", "--batch-size",
                                                    "8", "--eval-every", "4", "--rca-batches", "2",
                                                    "--reconstructor-width", "1", *extra])
    return TrainDirections.main(cfg)


def test_unmix_and_a_learned_deformator_started_from_it_through_the_trainer(mixed_file, tmp_path):
    from latentct.discover.directions import load_directions

    _run(mixed_file, tmp_path / "spectral", "--method", "spectral", "--feature-layer", "act", "--directions-count",
         "3", "--rca", "false", "--steps", "1")
    _run(mixed_file, tmp_path / "unmix", "--method", "unmix", "--unmix-from", str(tmp_path / "spectral" / "directions.pt"),
         "--unmix-size", "3", "--steps", "4")
    unmixed, G = load_directions(tmp_path / "unmix" / "directions.pt")
    assert unmixed.method == "unmix" and unmixed.extra["unmixed"] == "spectral" and unmixed.extra["m"] == 3
    assert best_cosines(unmixed.matrix, G.M).min() > 0.97 and 0 <= unmixed.rca <= 1
    # the study's deformator from the unmixed basis: the first columns start there, the rest at random
    _run(mixed_file, tmp_path / "learned", "--init-directions", str(tmp_path / "unmix" / "directions.pt"),
         "--directions-count", "5", "--steps", "1", "--lr-deformator", "0")
    learned, _ = load_directions(tmp_path / "learned" / "directions.pt")
    rows = learned.shifts(torch.arange(5), torch.ones(5))
    assert learned.method == "learned_unmix" and learned.extra["initialised_columns"] == 3
    assert torch.allclose(rows[:3], unmixed.matrix, atol=1e-5) and best_cosines(rows[3:], G.M).max() < 0.99
    assert unmixed.supervision == learned.supervision == "none"


def test_directions_built_from_a_supervised_file_inherit_its_supervision(mixed_file, tmp_path):
    """A span unmixed from, or a deformator started at, the supervised (labels) or metadata directions is not
    label-free: it carries the stronger tag, so no table ranks it among the label-free methods."""
    from latentct.discover.directions import load_directions

    _run(mixed_file, tmp_path / "spectral", "--method", "spectral", "--feature-layer", "act", "--directions-count",
         "3", "--rca", "false", "--steps", "1")
    for method, tag in (("supervised", "labels"), ("metadata", "metadata")):
        state = torch.load(tmp_path / "spectral" / "directions.pt", weights_only=True)
        state["method"] = method                                    # the same rows, as if fitted with labels
        torch.save(state, tmp_path / f"{method}.pt")
        assert load_directions(tmp_path / f"{method}.pt")[0].supervision == tag
        _run(mixed_file, tmp_path / f"unmix_{method}", "--method", "unmix", "--unmix-from", str(tmp_path / f"{method}.pt"),
             "--unmix-size", "3", "--steps", "1", "--rca", "false")
        _run(mixed_file, tmp_path / f"learned_{method}", "--init-directions", str(tmp_path / f"{method}.pt"),
             "--directions-count", "4", "--steps", "1", "--lr-deformator", "0")
        for kind in ("unmix", "learned"):
            assert load_directions(tmp_path / f"{kind}_{method}" / "directions.pt")[0].supervision == tag, (kind, method)


def test_the_metadata_method_finds_the_slice_direction_and_unmixes_patient_properties():
    """Codes of slices from 300 series that cover different slice ranges: the slice position moves them along one
    direction, three independent patient properties (uniform, so ICA can tell them apart) along non-orthogonal
    ones. Only series, patient and z_mm are given; the method returns the slice direction first, then each
    patient direction (the series' different ranges leave no slice in them)."""
    from latentct.discover.metadata import metadata_directions

    gen = torch.Generator().manual_seed(5)
    d = 8
    slice_dir = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    P = torch.nn.functional.normalize(torch.randn(d, 3, generator=gen), dim=0)
    P[:, 1] = torch.nn.functional.normalize(P[:, 0] + P[:, 1], dim=0)    # 45 degrees or so from the first
    codes, index = [], []
    for s in range(300):
        props = (torch.rand(3, generator=gen) * 2 - 1) * 3 ** 0.5
        start = float(torch.rand(1, generator=gen)) * 100 - 50   # series cover different slice ranges
        for z_mm in torch.linspace(start - 100, start + 100, 12):
            codes.append(slice_dir * z_mm / 50 + P @ props + 0.01 * torch.randn(d, generator=gen))
            index.append({"series_uid": f"s{s}", "patient_id": f"p{s}", "z_mm": f"{float(z_mm):.3f}"})
    directions, info, _ = metadata_directions(torch.stack(codes), index, count=4)
    assert directions.shape == (4, d) and info["patients"] == 300 and info["supervision"] == "metadata"
    assert abs(float(directions[0] @ slice_dir)) > 0.999
    assert info["slice_position"]["mm_per_unit"] == pytest.approx(50, rel=0.01)
    assert info["slice_position"]["within_series_share"] > 0.99
    assert best_cosines(directions[1:], P).min() > 0.97
    assert torch.linalg.matrix_rank(P) == 3 and (P[:, 0] @ P[:, 1]).abs() > 0.5    # not orthogonal


def test_ica_unmixing_reads_an_encoders_codes_and_needs_one(toy):
    from latentct.util.settings import UserError

    rows, _ = spectral(toy, 3, layer="act", samples=64)
    codes = lambda x: (x.flatten(1)[:, ::4], None)  # noqa: E731  a stand-in encoder: every fourth pixel
    found, info = by_ica(toy, rows, features="encoder", samples=1024, encoder=codes)
    assert info["features"] == "encoder" and best_cosines(found, toy.M).min() > 0.97
    with pytest.raises(UserError, match="no encoder"):
        by_ica(toy, rows, features="encoder", samples=64)


def test_the_metadata_method_reads_a_plugin_autoencoders_encoded_latents(gan_run, dataset, tmp_path):
    """A --latents file (python -m latentct.generators.latents writes one per split row) stands in for an encoder:
    codes planted to move along one direction with z_mm give that direction first; a file whose rows do not
    match the index is refused in one line."""
    from latentct.data.slices import read_index
    from latentct.discover.directions import load_directions
    from latentct.generators.interface import load_generator
    from latentct.util.settings import UserError

    index = read_index(dataset, "train")
    d = load_generator(gan_run / "generator.pt").latent_dim
    gen = torch.Generator().manual_seed(0)
    slice_dir = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    series = {s: torch.randn(d, generator=gen) for s in {row["series_uid"] for row in index}}
    codes = torch.stack([slice_dir * float(row["z_mm"]) / 20 + series[row["series_uid"]] for row in index])
    file = tmp_path / "latents.pt"
    torch.save({"latents": codes, "data": str(dataset), "split": "train", "encoder": "toy", "window": "default"}, file)
    _run(gan_run / "generator.pt", tmp_path / "meta", "--method", "metadata", "--latents", str(file), "--rca", "false",
         "--patient-directions", "2", "--metadata-unmix", "ica", "--steps", "1")
    found, _ = load_directions(tmp_path / "meta" / "directions.pt")
    assert found.method == "metadata" and found.extra["encoder"].startswith("encoded latents")
    assert abs(float(found.matrix[0] @ slice_dir)) > 0.999 and found.matrix.shape == (3, d)
    torch.save({"latents": codes[:-1], "data": str(dataset), "split": "train"}, file)
    with pytest.raises(UserError, match="--latents"):
        _run(gan_run / "generator.pt", tmp_path / "bad", "--method", "metadata", "--latents", str(file), "--rca",
             "false", "--steps", "1")
    # a --metadata-data set that is not a dataset, or of another image size, is one line naming the flag
    other = tmp_path / "other"
    with pytest.raises(UserError, match="--metadata-data names no preprocessed dataset"):
        _run(gan_run / "generator.pt", tmp_path / "bad", "--method", "metadata", "--metadata-data", str(other),
             "--rca", "false", "--steps", "1")
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"settings": {"size": 64}}))
    with pytest.raises(UserError, match="--metadata-data: .* holds 64 px slices, the generator makes 32 px"):
        _run(gan_run / "generator.pt", tmp_path / "bad", "--method", "metadata", "--metadata-data", str(other),
             "--rca", "false", "--steps", "1")
    assert not (tmp_path / "bad" / "directions.pt").exists()


class MovingEllipse(nn.Module):
    """32 x 32 images of a soft ellipse (a body) with a brighter inner disc, on a fixed table line that never moves.
    Its vertical position, left-right size and roll follow three unit latent directions 50-65 degrees apart; a
    fourth direction changes the inner disc's brightness (content, no motion); the other six latent dimensions
    each add a faint fixed pattern. Prior: N(0, I) in 10 dimensions."""

    latent_dim = 10

    def __init__(self, seed: int = 5):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(seed)))
        mix = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.55, 0.835, 0.0, 0.0], [0.35, 0.3, 0.887, 0.0],
                            [0.3, 0.0, 0.3, 0.906]])
        self.register_buffer("M", (mix @ q[:4]).t())                      # (10, 4) columns: the factor directions
        self.register_buffer("unmix", torch.linalg.pinv(self.M))
        self.register_buffer("rest", q[4:])                              # (6, 10) the dimensions the factors leave
        self.register_buffer("patterns", 0.05 * torch.randn(6, 32, 32, generator=torch.Generator().manual_seed(6)))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("xx", xx)
        self.register_buffer("yy", yy)

    def forward(self, z):
        s = z @ self.unmix.t()                                           # (N, 4) the factors
        dy, width, roll, inner = 0.08 * s[:, 0], 0.55 + 0.06 * s[:, 1], 0.12 * s[:, 2], 0.3 * s[:, 3]
        c, n = torch.cos(roll)[:, None, None], torch.sin(roll)[:, None, None]
        x, y = self.xx, self.yy - dy[:, None, None]
        u, v = c * x + n * y, -n * x + c * y                             # body frame
        r = (u / width[:, None, None]) ** 2 + (v / 0.4) ** 2
        body = torch.sigmoid((1 - r) * 12)
        disc = torch.sigmoid((1 - (u ** 2 + (v + 0.1) ** 2) / 0.04) * 12) * torch.tanh(inner)[:, None, None]
        table = torch.sigmoid((self.yy - 0.85) * 40).expand_as(body)
        faint = torch.einsum("nk,khw->nhw", torch.tanh(z @ self.rest.t()), self.patterns)
        return (2 * (body * (0.8 + 0.2 * disc)).clamp(max=1) + table - 1 + faint).unsqueeze(1)


def test_steering_finds_the_moving_factors_though_their_directions_are_not_orthogonal():
    from latentct.discover.unmix import EDITS, REPEAT, WEAK_WALK, by_steer

    toy = MovingEllipse().eval().requires_grad_(False)
    rows = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]  # an orthogonal base
    assert best_cosines(rows, toy.M[:, :3]).max() < 0.9                    # which holds none of them
    found, info = by_steer(toy, rows)
    assert found.shape == (8, 10) and torch.allclose(found.norm(dim=1), torch.ones(8), atol=1e-5)
    cosines = (found.double() @ found.double().t()).abs() - torch.eye(8, dtype=torch.float64)
    assert cosines.max() < REPEAT                                          # no row repeats another
    assert best_cosines(found, toy.M).min() > 0.95, best_cosines(found, toy.M)  # each planted direction
    assert info["reproduced"][EDITS.index("shift y")] > 0.5 > info["reproduced"][EDITS.index("shift x")]
    walks = [label for label in info["rows"] if label != "content"]
    assert walks == sorted(walks, key=lambda e: -info["reproduced"][EDITS.index(e)])  # best-fitting walks first
    # the content directions come after the walks that perform their edit, before any that barely does
    first, last = info["rows"].index("content"), len(info["rows"]) - info["rows"][::-1].index("content")
    best = max(info["reproduced"])
    assert all(info["reproduced"][EDITS.index(e)] >= WEAK_WALK * best for e in info["rows"][:first])
    assert all(info["reproduced"][EDITS.index(e)] < WEAK_WALK * best for e in info["rows"][last:])
    assert "shift x" in info["rows"][last:] and len(info["content_share"]) == info["rows"].count("content")


class BodyWithTwoContents(nn.Module):
    """32 x 32 images of a soft ellipse that moves (vertical position, left-right size and roll) and carries two
    small discs whose brightness changes (content no edit explains, in different parts of the body, as slice
    level and breast size are on CT). The five factor directions are unit latent directions 40-65 degrees apart;
    the two contents' are 55 degrees apart. The other five latent dimensions move nothing. Prior: N(0, I)."""

    latent_dim = 10

    def __init__(self, seed: int = 5):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(seed)))
        mix = torch.tensor([[1.0, 0, 0, 0, 0], [0.55, 0.835, 0, 0, 0], [0.35, 0.3, 0.887, 0, 0],
                            [0.3, 0.0, 0.3, 0.906, 0], [0.0, 0.3, 0.0, 0.6, 0.742]])
        self.register_buffer("M", (mix @ q[:5]).t())                      # (10, 5) columns: the factor directions
        self.register_buffer("unmix", torch.linalg.pinv(self.M))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("xx", xx.clone())                           # own memory: a saved toy loads back
        self.register_buffer("yy", yy.clone())

    def body(self, z):
        """The factors, the body frame's coordinates and the moving ellipse."""
        s = z @ self.unmix.t()
        dy, width, roll = 0.08 * s[:, 0], 0.55 + 0.06 * s[:, 1], 0.12 * s[:, 2]
        c, n = torch.cos(roll)[:, None, None], torch.sin(roll)[:, None, None]
        x, y = self.xx, self.yy - dy[:, None, None]
        u, v = c * x + n * y, -n * x + c * y                             # body frame
        return s, u, v, torch.sigmoid((1 - (u / width[:, None, None]) ** 2 - (v / 0.4) ** 2) * 12)

    def forward(self, z):
        s, u, v, body = self.body(z)

        def disc(cu, cv, value):
            return torch.sigmoid((1 - ((u - cu) ** 2 + (v - cv) ** 2) / 0.02) * 12) * torch.tanh(value)[:, None, None]

        inner = 0.2 * disc(0.2, -0.1, 0.3 * s[:, 3]) + 0.2 * disc(-0.25, 0.15, 0.3 * s[:, 4])
        table = torch.sigmoid((self.yy - 0.85) * 40).expand_as(body)
        return (2 * (body * (0.8 + inner)).clamp(max=1) + table - 1).unsqueeze(1)


def test_steering_unmixes_the_change_no_edit_explains():
    """The two contents leave the edits' change alike (each is all unexplained), so an orthogonal cut of their
    subspace is arbitrary (the generalised eigenvectors the walks' content once was: best cosine 0.93 for one);
    their leftover image changes are apart at every latent, which joint diagonalisation finds."""
    from latentct.discover.unmix import by_steer

    toy = BodyWithTwoContents().eval().requires_grad_(False)
    rows = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    found, info = by_steer(toy, rows)
    content = found[[i for i, label in enumerate(info["rows"]) if label == "content"]]
    assert best_cosines(content, toy.M[:, 3:]).min() > 0.99, best_cosines(content, toy.M[:, 3:])
    assert min(info["content_share"][:2]) > 0.9                    # their change is the edits' leftover
    assert min(info["content_share"]) > 0.5 and len(info["content_share"]) == info["rows"].count("content") <= 3
    assert best_cosines(found, toy.M[:, :3]).min() > 0.85            # the motions' walks are still there


def test_the_whole_latent_as_the_span_holds_what_a_top_k_span_misses(tmp_path, monkeypatch):
    """An orthogonal base whose top 9 directions are orthogonal to the vertical factor (a SeFa or spectral ranking
    can put a factor's direction low): no cut of that span finds it. ``--unmix-from latent`` takes every axis of
    the latent as the span, and the conditional walks with four content rows find each planted direction."""
    from latentct.discover.directions import load_directions
    from latentct.discover.unmix import by_steer, whole_latent
    from latentct.generators import interface as generators
    from latentct.generators.interface import save_generator
    from latentct.util.settings import UserError

    toy = BodyWithTwoContents().eval().requires_grad_(False)
    mixed = torch.cat([toy.M[:, :1], torch.randn(10, 9, generator=torch.Generator().manual_seed(1))], 1)
    q = torch.linalg.qr(mixed)[0]
    base = torch.cat([q[:, 1:].t(), q[:, :1].t()])                         # the vertical factor's axis last
    missed, _ = by_steer(toy, base[:9], conditional=True)
    assert best_cosines(missed, toy.M)[0] < 0.1                            # outside the span: not found
    assert torch.equal(whole_latent(toy), torch.eye(10))
    monkeypatch.setitem(generators.KINDS, "twocontents", BodyWithTwoContents)
    save_generator(tmp_path / "toy.pt", "twocontents", toy, {}, "default", "")
    _run(tmp_path / "toy.pt", tmp_path / "whole", "--method", "unmix", "--unmix-from", "latent", "--unmix-by",
         "conditional", "--unmix-content", "4", "--rca", "false", "--steps", "1")
    found = load_directions(tmp_path / "whole" / "directions.pt")[0]
    assert found.extra["unmixed"] == "latent" and found.extra["m"] == 10 and found.extra["unmix_by"] == "conditional"
    assert best_cosines(found.matrix, toy.M).min() > 0.95, best_cosines(found.matrix, toy.M)
    assert found.extra["rows"].count("content") >= 2 and found.count <= 10
    with pytest.raises(UserError, match=r"--unmix-content: the steering walks need a span of at least 11 "
                                        r"directions \(six edits and 5 content\), got 10 \(the whole latent's"):
        _run(tmp_path / "toy.pt", tmp_path / "crowded", "--method", "unmix", "--unmix-from", "latent",
             "--unmix-by", "conditional", "--unmix-content", "5", "--rca", "false", "--steps", "1")
    with pytest.raises(UserError, match="--unmix-content: must be 0 or more"):
        _run(tmp_path / "toy.pt", tmp_path / "none", "--method", "unmix", "--unmix-from", "latent",
             "--unmix-content", "-1")

    class Wide(nn.Module):
        latent_dim = 200

    with pytest.raises(UserError, match="--unmix-from latent: the latent has 200 dimensions, more than the 128"):
        whole_latent(Wide())


class BodyOnBrightTable(BodyWithTwoContents):
    """32 x 32 images of a soft ellipse (vertical position, left-right size, roll, an inner disc's brightness) on a
    table that never moves but whose brightness varies. The edits' vertical shift moves the table's edge too, which
    no motion of the body does: the one change that looks like it there is the table's brightness. Five factor
    directions 40-65 degrees apart (BodyWithTwoContents's); prior N(0, I) in 10 dimensions."""

    def forward(self, z):
        s, u, v, body = self.body(z)
        disc = torch.sigmoid((1 - ((u - 0.2) ** 2 + (v + 0.1) ** 2) / 0.02) * 12) * torch.tanh(0.3 * s[:, 4])[:, None, None]
        table = torch.sigmoid((self.yy - 0.75) * 20) * (1 + 0.3 * torch.tanh(s[:, 3]))[:, None, None]
        return (2 * (body * (0.8 + 0.2 * disc)).clamp(max=1) + table - 1).unsqueeze(1)


@pytest.mark.parametrize("draw,seed", [(0, 5), (2, 6)])
def test_the_metadata_span_cut_by_steering_finds_gaussian_patient_properties(draw, seed, tmp_path, monkeypatch):
    """Codes of 300 series x 4 slices of the two-contents body (a plug-in's encoded latents): within a series only
    the first disc's brightness follows z_mm (the slice level); the patient properties (vertical position, width,
    roll, the second disc) and five faint nuisance dimensions are Gaussian, so FastICA has nothing to cut the
    patient-level subspace by (best cosines 0.69-0.82 for some factor over four draws, two here). Cut by the conditional
    steering walks, every factor is found (>= 0.92) and the slice direction is kept as the metadata measured it."""
    import csv

    from latentct.discover.directions import load_directions
    from latentct.generators import interface as generators
    from latentct.generators.interface import save_generator
    from latentct.util.settings import UserError

    monkeypatch.setitem(generators.KINDS, "twocontents", BodyWithTwoContents)
    toy = BodyWithTwoContents(seed)
    save_generator(tmp_path / "toy.pt", "twocontents", toy, {}, "default", "")
    gen = torch.Generator().manual_seed(draw)
    nuisance = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(seed)))[0][5:]
    codes, index = [], []
    for s in range(300):
        props, faint = torch.randn(5, generator=gen), 0.3 * torch.randn(5, generator=gen)
        start = float(torch.rand(1, generator=gen)) * 100 - 50        # series cover different slice ranges
        for z_mm in torch.linspace(start - 100, start + 100, 4):
            props[3] = z_mm / 50
            codes.append(toy.M @ props + nuisance.t() @ faint + 0.01 * torch.randn(10, generator=gen))
            index.append({"series_uid": f"s{s}", "patient_id": f"p{s}", "z_mm": f"{float(z_mm):.3f}"})
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train_index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows(index)
    file = tmp_path / "latents.pt"
    torch.save({"latents": torch.stack(codes), "data": str(tmp_path / "data"), "split": "train"}, file)
    found = {}
    for how in ("ica", "conditional"):
        _run(tmp_path / "toy.pt", tmp_path / how, "--method", "metadata", "--latents", str(file), "--rca", "false",
             "--patient-directions", "7", "--metadata-unmix", how, "--steps", "1")
        found[how] = load_directions(tmp_path / how / "directions.pt")[0]
    ica, steered = found["ica"], found["conditional"]
    assert best_cosines(ica.matrix, toy.M).min() < 0.85, best_cosines(ica.matrix, toy.M)
    assert best_cosines(steered.matrix, toy.M).min() > 0.9, best_cosines(steered.matrix, toy.M)
    assert torch.allclose(steered.matrix[0], ica.matrix[0], atol=1e-5)      # the slice direction, as measured
    assert abs(float(steered.matrix[0] @ toy.M[:, 3])) / toy.M[:, 3].norm() > 0.999
    unmixed = steered.extra["steered"]
    assert unmixed["rows"][0] == "given" and unmixed["rows"].count("given") == 1
    assert unmixed["unmix_by"] == "conditional" and steered.extra["supervision"] == "metadata"
    assert len(unmixed["content_share"]) == sum(r in ("given", "content") for r in unmixed["rows"])
    # a span too small for the walks is one line naming the flag (before anything is encoded), or the series
    with pytest.raises(UserError, match="--patient-directions: with --metadata-unmix conditional: at least 7"):
        _run(tmp_path / "toy.pt", tmp_path / "small", "--method", "metadata", "--latents", str(file),
             "--patient-directions", "5")
    few = [i for i, row in enumerate(index) if int(row["series_uid"][1:]) < 6]
    torch.save({"latents": torch.stack(codes)[few], "data": str(tmp_path / "few"), "split": "train"}, file)
    (tmp_path / "few").mkdir()
    with open(tmp_path / "few" / "train_index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows([index[i] for i in few])
    with pytest.raises(UserError, match=r"span would hold 6 directions .*6 series - 1"):
        _run(tmp_path / "toy.pt", tmp_path / "few_out", "--method", "metadata", "--latents", str(file), "--rca",
             "false")
    assert not (tmp_path / "few_out" / "directions.pt").exists()


@pytest.mark.parametrize("seed", [5, 6])
def test_conditioned_walks_leave_out_what_only_helps_them_match_their_edit(seed):
    """The independent vertical-shift walk takes the table's brightness along (best cosine with the body's vertical
    position 0.63-0.66 on seeds 5-7); conditioned on the other edits and the content it may not (0.89-0.90), and
    every other factor stays found."""
    from latentct.discover.unmix import by_steer

    toy = BodyOnBrightTable(seed).eval().requires_grad_(False)
    rows = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    free, _ = by_steer(toy, rows)
    conditioned, info = by_steer(toy, rows, conditional=True)
    assert info["unmix_by"] == "conditional" and conditioned.shape == free.shape
    before, after = best_cosines(free, toy.M), best_cosines(conditioned, toy.M)
    assert before[0] < 0.7 and after[0] > 0.85, (before, after)
    assert after[1:].min() > 0.95, after
    assert min(info["content_share"]) > 0.5                          # the content rows stay mostly unexplained


@pytest.mark.parametrize("seed", [0, 1, 3, 5, 6, 9])
def test_conditioning_drops_a_condition_it_cannot_meet(seed):
    """On the moving ellipse no factor scales it vertically, yet that walk reproduces a quarter of its edit (the
    vertical shift does): no small direction does a vertical shift and no vertical scaling, and solving for it
    anyway collapses the conditioned walks onto what barely moves the image (best cosines 0.30-0.44 for the
    vertical position and width). Such conditions are dropped and the rest solved again: every planted direction
    is found, at least as well as by the independent walks."""
    from latentct.discover.unmix import by_steer

    toy = MovingEllipse(seed).eval().requires_grad_(False)
    rows = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    free, _ = by_steer(toy, rows)
    conditioned, _ = by_steer(toy, rows, conditional=True)
    assert (best_cosines(conditioned, toy.M) >= best_cosines(free, toy.M) - 0.01).all()
    assert best_cosines(conditioned, toy.M)[1:].min() > 0.95


def test_condition_meets_each_kept_constraint_and_drops_the_rest():
    """condition() on a constructed span whose image changes are two correlated edits (cosine 0.6); a third edit
    is what the two do together, which no direction does alone beside them. One of the three conditions is dropped
    (its walk stays as it was: all three kept give a least-squares compromise that meets none); each of the two
    kept does its own edit and none of the other one."""
    from latentct.discover.unmix import condition

    gen = torch.Generator().manual_seed(0)
    N, m, P = 16, 5, 40
    flows = torch.randn(N, 6, P, generator=gen, dtype=torch.float64)
    flows[:, 1] = 0.6 * flows[:, 0] + 0.8 * flows[:, 1]
    flows[:, 2] = flows[:, 0] + flows[:, 1]                       # edit 2 only ever happens with edits 0 and 1
    A = torch.randn(m, 2, generator=gen, dtype=torch.float64)      # how the span's coordinates do edits 0 and 1
    J = torch.einsum("ik,nkp->nip", A, flows[:, :2]) + 0.01 * torch.randn(N, m, P, generator=gen, dtype=torch.float64)
    metric, target = torch.einsum("nip,njp->ij", J, J), torch.einsum("nip,nkp->ki", J, flows)
    value, vector = torch.linalg.eigh(metric)
    white = vector / value.sqrt()
    walks = target @ white @ white.t()
    conditioned, _ = condition(J, flows, J.clone(), white, metric, target, walks, walks[:0], [0, 1, 2])
    same = [k for k in range(3) if torch.equal(conditioned[k], walks[k])]
    assert len(same) == 1, same
    kept = [k for k in range(3) if k not in same]

    def does(w):                                                    # edits 0 and 1 done by latent change w
        return A.t() @ w

    own = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0]), 2: torch.tensor([1.0, 1.0])}
    for k in kept:
        other = next(j for j in kept if j != k)
        d = does(conditioned[k])
        # as an amount of edits (0, 1): k's own pattern, nothing of the other kept one's
        coef = torch.linalg.lstsq(torch.stack([own[k], own[other]], 1).double(), d[:, None]).solution[:, 0]
        assert abs(float(coef[1])) < 0.02 * abs(float(coef[0])), (k, coef)


def test_steering_survives_a_flat_image():
    from latentct.discover.unmix import by_steer

    class SometimesBlank(MovingEllipse):
        def forward(self, z):
            out = super().forward(z)
            return torch.where(z[:, :1, None, None] > 1.5, torch.full_like(out, -1.0), out)  # all air

    found, info = by_steer(SometimesBlank().eval().requires_grad_(False), torch.eye(10))
    assert len(found) == 8 and torch.isfinite(found).all()


def test_steering_refuses_a_span_that_moves_nothing():
    from latentct.discover.unmix import by_steer
    from latentct.util.settings import UserError

    class Still(MovingEllipse):
        def forward(self, z):
            return super().forward(0 * z)                                # the same image at every latent

    with pytest.raises(UserError, match="no direction of the span changes the generated images"):
        by_steer(Still().eval().requires_grad_(False), torch.eye(10))


def test_steering_needs_room_for_the_edits():
    from latentct.discover.unmix import by_steer
    from latentct.util.settings import UserError

    with pytest.raises(UserError, match="at least 8 directions"):
        by_steer(MovingEllipse(), torch.eye(10)[:7])


def test_metadata_directions_read_back_through_an_encoder_land_in_the_generators_latent():
    """An autoencoder whose encoder does not invert the decoder: E(G(z)) = T z with T a strong shear. A property
    that latent direction v makes moves real slices' codes along T v, so the metadata method's code-space
    directions are T v, not v; read back (the readings of E(G(z)) fitted on z) they are v again."""
    from latentct.discover.metadata import metadata_directions, read_back

    gen = torch.Generator().manual_seed(11)
    d = 4
    V = torch.nn.functional.normalize(torch.randn(d, d, generator=gen), dim=0)   # slice, then three properties
    V[:, 2] = torch.nn.functional.normalize(V[:, 1] + V[:, 2], dim=0)           # two of them far from orthogonal
    T = torch.eye(d) + 1.5 * torch.triu(torch.ones(d, d), 1)                     # what the encoder adds
    A = torch.randn(16, d, generator=gen)                                        # the decoder: 4 x 4 images

    class Decoder(torch.nn.Module):
        latent_dim = d

        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(A.clone(), requires_grad=False)

        def forward(self, z):
            return (z @ self.A.t()).reshape(-1, 1, 4, 4)

    encoder = lambda x: (x.flatten(1) @ torch.linalg.pinv(A).t() @ T.t(), None)  # noqa: E731
    codes, index = [], []
    for s in range(300):
        props = (torch.rand(3, generator=gen) * 2 - 1) * 3 ** 0.5
        start = float(torch.rand(1, generator=gen)) * 100 - 50
        for z_mm in torch.linspace(start - 60, start + 60, 4):
            latent = V @ torch.cat([torch.tensor([float(z_mm) / 50]), props])
            codes.append(T @ latent + 0.01 * torch.randn(d, generator=gen))
            index.append({"series_uid": f"s{s}", "patient_id": f"p{s}", "z_mm": f"{float(z_mm):.3f}"})
    in_codes, _, read = metadata_directions(torch.stack(codes), index, count=d)
    found, info = read_back(Decoder(), encoder, read, samples=512)
    assert found.shape == (d, d) and info["read_back"]["fit_r2"]["slice"] > 0.99
    assert abs(float(found[0] @ V[:, 0])) > 0.99 and best_cosines(found[1:], V[:, 1:]).min() > 0.99
    assert best_cosines(in_codes, V).min() < 0.9   # in the codes' space they are T v


class Ellipses(nn.Module):
    """64 x 64 soft-tissue ellipses in air (window -1000..1000 HU, 1 mm pixels): z[0] and z[1] move the centre,
    z[2] the half-width and z[2] + z[3] the half-height, so width and AP thickness change together along z[2]
    and their directions are not orthogonal; z[4:] draw nothing. No lungs, bone or rotation."""

    latent_dim = 6
    window = (-1000.0, 1000.0)
    dataset = None

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))   # the device the images are drawn on

    def forward(self, z):
        grid = torch.arange(64, dtype=torch.float32) + 0.5 - 32
        y, x = grid.view(1, 64, 1), grid.view(1, 1, 64)
        cx, cy = 3 * z[:, 0, None, None], 3 * z[:, 1, None, None]
        a, b = 14 + 3 * z[:, 2, None, None], 10 + 2 * (z[:, 2] + z[:, 3])[:, None, None]
        inside = torch.sigmoid(4 * (1 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2))
        return (inside * 1.04 - 1)[:, None]           # -1000 HU outside, +40 HU inside


def test_measurement_directions_each_move_their_measurement_and_hold_the_rest():
    """The fit maps the latent to the anatomy measurements and inverts it: along the width direction the width
    grows while the AP thickness holds (though the toy's width coordinate moves both), and the reverse; what the
    toy cannot move (lungs, bone, rotation, mean HU) is left out with its reason, and the method is tagged as
    using measurements."""
    from latentct.data.slices import unit_to_hu
    from latentct.discover.baselines import measurements
    from latentct.score import anatomy

    G = Ellipses()
    directions, info = measurements(G, G.window, 1.0, samples=384, seed=0)
    assert info["supervision"] == "measurements" and set(info["left_out"]) >= {"lung_area", "bone_area",
                                                                                "anterior_tissue"}
    assert set(info["measures"]) == {"width", "thickness", "centroid_x", "centroid_y"}
    assert info["left_out"]["body_area"].startswith("moves with")   # width and thickness determine it
    assert directions.shape == (len(info["measures"]), 6) and torch.allclose(directions.norm(dim=1), torch.ones(1))
    z = torch.randn(64, 6, generator=torch.Generator().manual_seed(5))

    def change(name):
        row = directions[info["measures"].index(name)]
        before, after = (anatomy.measure(unit_to_hu(G(z + s * row), G.window)) for s in (-1.0, 1.0))
        return {m: float((after[m] - before[m]).mean()) / info["spreads"][m] for m in info["measures"]}

    width, thickness = change("width"), change("thickness")
    assert width["width"] > 0.3 and abs(width["thickness"]) < 0.25 * width["width"]
    assert thickness["thickness"] > 0.3 and abs(thickness["width"]) < 0.25 * thickness["thickness"]
    assert abs(width["centroid_x"]) < 0.25 * width["width"]
    # the toy's own width coordinate moves both: the fit undid that
    assert abs(float(torch.nn.functional.cosine_similarity(directions[info["measures"].index("width")],
                                                           torch.eye(6)[2], dim=0))) < 0.95


def test_measurements_refuse_a_generator_without_a_window():
    from latentct.discover.baselines import measurements
    from latentct.util.settings import UserError

    with pytest.raises(UserError, match="output_window"):
        measurements(Ellipses(), None, 1.0, samples=64)


def test_the_measurements_method_through_the_trainer_is_tagged_and_measured_in_mm(gan_run, tmp_path):
    """On the tiny DCGAN of the phantom: a directions file whose rows are unit and one per measurement it kept,
    measured in the dataset's mm (not pixels), tagged "measurements" so no table ranks it among the label-free
    methods."""
    from latentct.data.slices import dataset_spacing
    from latentct.discover.directions import load_directions

    _run(gan_run / "generator.pt", tmp_path / "measurements", "--method", "measurements", "--supervised-samples", "256",
         "--rca", "false", "--steps", "1")
    dirs, G = load_directions(tmp_path / "measurements" / "directions.pt")
    assert dirs.method == "measurements" and dirs.supervision == "measurements"
    assert dirs.count == len(dirs.extra["measures"]) >= 2
    assert torch.allclose(dirs.unit_rows().norm(dim=1).float(), torch.ones(dirs.count))
    spacing, why = dataset_spacing(G.dataset)
    assert why is None and spacing != 1.0 and dirs.extra["spacing_mm"] == spacing
    assert set(dirs.extra["measures"]).isdisjoint(dirs.extra["left_out"])


class GatedEllipses(Ellipses):
    """Ellipses whose lungs (two -800 HU discs) vanish where z[2] < -1 (about 16% of images: anterior tissue is
    undefined there) and whose bone disc is drawn on exactly those images."""

    def forward(self, z):
        grid = torch.arange(64, dtype=torch.float32) + 0.5 - 32
        y, x = grid.view(1, 64, 1), grid.view(1, 1, 64)
        cx, cy = 3 * z[:, 0, None, None], 3 * z[:, 1, None, None]
        a, b = 20 + 3 * z[:, 2, None, None], 14 + 2 * z[:, 3, None, None]
        body = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1
        image = torch.where(body, torch.tensor(0.04), torch.tensor(-1.0))
        gate = (z[:, 2] > -1)[:, None, None]
        r = (4 + z[:, 4]).clamp(2, 7)[:, None, None]
        lungs = ((x - cx - 8) ** 2 + (y - cy) ** 2 < r ** 2) | ((x - cx + 8) ** 2 + (y - cy) ** 2 < r ** 2)
        image = torch.where(lungs & body & gate, torch.tensor(-0.8), image)
        bone = ((x - cx) ** 2 + (y - cy - 8) ** 2 < 36) & body & ~gate
        return torch.where(bone, torch.tensor(1.0), image)[:, None]


def test_measurements_fit_every_image_their_chosen_measurements_are_defined_on():
    """Found by review: images where a measurement later left out is undefined were dropped from the final fit
    (every narrow body, here), the spreads reported were not the ones divided by, and a measurement that varies
    only on the dropped images (bone) crashed lstsq with a spread of 0."""
    from latentct.data.slices import unit_to_hu
    from latentct.discover.baselines import fit_latents, measurements
    from latentct.score import anatomy

    G = GatedEllipses()
    directions, info = measurements(G, G.window, 1.0, samples=384, seed=0)
    assert "anterior_tissue" not in info["measures"] and directions.isfinite().all()
    assert info["left_out"]["bone_area"] == "flat on the images where the others are defined"
    defined = torch.ones(384, dtype=torch.bool)
    z = fit_latents(G, 384, 0)
    measured = anatomy.measure(unit_to_hu(G(z), G.window))
    for name in info["measures"]:
        defined &= torch.isfinite(measured[name][:384])
    assert info["images"] == int(defined.sum()) > 0.95 * 384     # not the 84% with lungs
    for name in info["measures"]:
        assert info["spreads"][name] == pytest.approx(float(measured[name][:384][defined].double().std()), rel=1e-6)


def test_measurements_name_too_few_samples():
    from latentct.discover.baselines import measurements
    from latentct.util.settings import UserError

    with pytest.raises(UserError, match="raise --supervised-samples"):
        measurements(Ellipses(), Ellipses.window, 1.0, samples=3)


class SlidingBlob(nn.Module):
    """32 x 32 images of a smooth bright blob whose centre moves down with z[0] and right with z[1]; z[2] changes
    nothing. A move of the whole image: the shift edits' flows are its first-order change, exactly."""

    latent_dim = 3

    def forward(self, z):
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        cy, cx = 0.1 * z[:, 0, None, None], 0.1 * z[:, 1, None, None]
        return (2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.18) - 1).unsqueeze(1)


def test_the_edit_flows_bench_gives_a_whole_image_move_to_its_edit_and_content_to_none():
    from bench.edit_flows import edit_shares
    from latentct.discover.unmix import EDITS

    alone, together = edit_shares(SlidingBlob(), torch.eye(3)[:2], latents=16)
    assert alone.shape == (2, 6) and together.shape == (2,)
    for row, edit in enumerate(("shift y", "shift x")):                     # a move is its edit, and no other
        assert alone[row, EDITS.index(edit)] > 0.97 and together[row] > 0.97, (edit, alone[row], together[row])
        assert alone[row].sum() - alone[row, EDITS.index(edit)] < 0.05
    toy = MovingEllipse().eval().requires_grad_(False)
    alone, together = edit_shares(toy, toy.M.t(), latents=32)
    assert alone[0].argmax() == EDITS.index("shift y") and alone[1].argmax() == EDITS.index("scale x")
    assert together[3] < 0.01 < 0.4 < together[:3].min()                  # the inner disc's brightness moves nothing


def test_the_edit_flows_bench_names_a_missing_supervised_file_before_any_work(tmp_path):
    from bench.edit_flows import Settings, main
    from latentct.util.settings import UserError

    (tmp_path / "runs" / "r" / "vae").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "vae" / "generator.pt").write_bytes(b"never read: the check comes first")
    with pytest.raises(UserError, match="vae_supervised/directions.pt not found"):
        main(Settings(run="r", root=str(tmp_path), generators=["vae"]))
