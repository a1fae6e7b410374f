import math

import numpy as np
import pytest
import torch

from latentct.discover.baselines import fit_directions
from latentct.score import subspace


def unit(v):
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm()


def test_principal_angles_and_shares_on_a_constructed_pair_of_spans():
    spans = torch.eye(4, dtype=torch.float64)[:2]                     # e1, e2
    other = torch.stack([unit([1, 0, 0, 0]), unit([0, 1, 1, 0])])     # e1 and halfway between e2 and e3
    assert subspace.principal_angles(spans, other) == pytest.approx([0.0, 45.0], abs=1e-6)
    basis = subspace.orthonormal_basis(spans)
    shares = subspace.share_in_span(basis, torch.stack([unit([1, 1, 1, 1]), unit([0, 0, 1, 0])]))
    assert shares == pytest.approx([math.sqrt(0.5), 0.0], abs=1e-9)


def test_chance_share_is_what_random_spans_hold():
    d, k = 64, 8
    gen = torch.Generator().manual_seed(0)
    v = unit(torch.randn(d, generator=gen, dtype=torch.float64))[None]
    shares = [subspace.share_in_span(subspace.orthonormal_basis(torch.randn(k, d, generator=gen,
                                                                            dtype=torch.float64)), v)[0]
              for _ in range(400)]
    assert np.sqrt(np.mean(np.square(shares))) == pytest.approx(subspace.chance_share(k, d), rel=0.05)


class DeadDimensions(torch.nn.Module):
    """A generator that draws only from its first two latent coordinates (a 16 x 16 image, linear in them); the
    other six move nothing, as a VAE's unused dimensions."""

    latent_dim = 8

    def __init__(self):
        super().__init__()
        self.patterns = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))

    def forward(self, z):
        return (z[:, :2] @ self.patterns).view(len(z), 1, 16, 16)


def test_image_shares_ignore_what_dead_dimensions_hold():
    """A supervised direction fitted with noise in the dead dimensions (0.6 of its norm there) lies 0.8 inside a
    span of the two live coordinates by the latent's measure, and wholly inside it by its image change; a span
    of dead coordinates holds none of it; and the chance level is measured on random spans' image changes, not
    sqrt(k / d)."""
    G, z = DeadDimensions(), torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(8)
    sup = (0.8 * eye[0] + 0.6 * eye[5])[None]
    gen = torch.Generator().manual_seed(1)
    randoms = [torch.nn.functional.normalize(torch.randn(2, 8, generator=gen), dim=1) for _ in range(30)]
    out = subspace.diagnose_images(G, {"live": eye[:2], "dead": eye[2:4]}, sup, randoms, z, ["f"])
    live, dead = out["live"], out["dead"]
    entry, _ = subspace.diagnose(eye[:2], sup, 2, ["f"])
    assert entry["share_in_span"]["f"] == pytest.approx(0.8) and live["share_in_span"]["f"] == pytest.approx(1.0)
    assert live["angles_deg"] == pytest.approx([0.0], abs=1e-3) and live["latents"] == 6
    assert dead["share_in_span"]["f"] == pytest.approx(0.0, abs=1e-6)
    chance = live["chance"]["f"]
    assert chance == pytest.approx(1.0, abs=1e-3)


def test_image_measure_counts_a_repeated_direction_once_and_needs_random_spans_for_a_chance():
    """Two directions that draw the same image change make a one-dimensional span: one principal angle, not a
    second one from float32 noise; without random spans there is no chance level (not a chance of 0)."""
    G, z = DeadDimensions(), torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(8)
    twice = torch.stack([eye[0], 0.3 * eye[0] + eye[6]])    # the same image change up to float32 rounding
    out = subspace.diagnose_images(G, {"twice": twice}, eye[:2], [], z, ["a", "b"])["twice"]
    assert out["angles_deg"] == pytest.approx([0.0], abs=1e-2) and out["chance"] is None
    assert out["share_in_span"]["a"] == pytest.approx(1.0, abs=1e-4)


def test_one_gram_for_every_span_gives_each_span_its_own_measure():
    """diagnose_images computes one gram for all spans; each method's shares and angles equal those of its own
    gram alone, and its chance level is the mean over the random spans of its own size (the first k rows of each
    random sequence), whatever other methods are diagnosed beside it."""
    G = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 64))
    G.requires_grad_(False)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(4)
    sup = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    a, b = torch.randn(2, 8, generator=gen), torch.randn(5, 8, generator=gen)
    randoms = [subspace.random_rows(5, 8, seed).float() for seed in range(4)]
    both = subspace.diagnose_images(G, {"a": a, "b": b}, sup, randoms, z, ["x", "y", "w"])
    alone = subspace.diagnose_images(G, {"a": a}, sup, [r[:2] for r in randoms], z, ["x", "y", "w"])["a"]
    shares, angles = subspace.image_shares(G, a, sup, z)
    assert list(both["a"]["share_in_span"].values()) == pytest.approx(shares, abs=1e-4)
    assert both["a"]["angles_deg"] == pytest.approx(angles, abs=1e-2)
    assert both["a"]["chance"] == pytest.approx(alone["chance"], abs=1e-4)
    by_hand = sum(subspace.image_shares(G, r[:2], sup, z)[0] for r in randoms) / len(randoms)
    assert list(both["a"]["chance"].values()) == pytest.approx(by_hand, abs=1e-4)
    assert both["b"]["chance"] != both["a"]["chance"]      # spans of 5 hold more than spans of 2
    assert subspace.random_rows(2, 8, 7) == pytest.approx(subspace.random_rows(9, 8, 7)[:2])


def test_image_gram_follows_the_generator_to_its_device():
    """Latents and rows on the CPU, the generator elsewhere (the meta device stands in for a GPU): the products
    are taken where the generator is."""
    G = torch.nn.Linear(8, 16).to("meta")
    with pytest.raises(NotImplementedError):  # meta tensors cannot be copied back: it got as far as the output
        subspace.image_gram(G, torch.eye(8)[:3], torch.randn(4, 8))


def test_image_gram_is_the_mean_inner_product_of_image_changes():
    G, z = DeadDimensions(), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    rows = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    J = (rows[:, :2] @ G.patterns).double()                  # the image change per row: linear, the same everywhere
    assert subspace.image_gram(G, rows, z) == pytest.approx((J @ J.T).numpy(), rel=1e-4)
    coords = subspace.image_coordinates(subspace.image_gram(G, rows, z))
    assert (coords @ coords.T).numpy() == pytest.approx((J @ J.T).numpy(), rel=1e-4, abs=1e-2)


def test_ranked_methods_keep_their_top_k_and_unordered_ones_all():
    assert subspace.span_size("sefa", 12, 4) == 4 and subspace.span_size("spectral", 3, 5) == 3
    assert subspace.span_size("learned", 12, 4) == 12 and subspace.span_size("random", 16, 0) == 16


def test_span_ceiling_finds_non_orthogonal_factor_directions_inside_a_rotated_span():
    """Three factors read linearly off a 10-d latent along non-orthogonal directions. A method that returns an
    orthogonal basis of the right span (here a rotation of it) has every supervised direction inside its span,
    and the refit inside the span gives back the factor directions; a span that misses one factor's direction
    holds less of it and its refit cannot isolate it."""
    d = 10
    gen = torch.Generator().manual_seed(1)
    B = torch.zeros(3, d, dtype=torch.float64)
    B[0, 0], B[1, 0], B[1, 1], B[2, 2], B[2, 1] = 1.0, 0.8, 0.6, 1.0, 0.9   # rows far from orthogonal
    z = torch.randn(3000, d, generator=gen, dtype=torch.float64)
    readings = z @ B.t() + 0.01 * torch.randn(3000, 3, generator=gen, dtype=torch.float64)
    truth, _ = fit_directions(z, readings, 2000)
    span = torch.linalg.qr(torch.linalg.pinv(B))[0].t()                         # orthonormal rows of the span
    rotated = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0] @ span
    entry, basis = subspace.diagnose(rotated, truth.double(), 3, ("a", "b", "c"))
    assert max(entry["angles_deg"]) < 1.0 and min(entry["share_in_span"].values()) > 0.999
    assert entry["chance"] == pytest.approx(math.sqrt(3 / d), abs=1e-4)
    ceiling, info = fit_directions(z, readings, 2000, basis)
    assert (ceiling.double() * truth.double()).sum(1) == pytest.approx([1, 1, 1], abs=1e-3)
    assert min(info["fit_r2"].values()) > 0.99
    # the rotated basis itself moves each factor together with others: no row is one factor's direction
    cosines = (rotated / rotated.norm(dim=1, keepdim=True)) @ truth.double().t()
    assert cosines.abs().max() < 0.99
    # a span that misses the third factor's direction
    missing, _ = subspace.diagnose(torch.stack([span[0], span[1], unit(torch.eye(d)[5])]), truth.double(), 3,
                                   ("a", "b", "c"))
    assert missing["share_in_span"]["c"] < 0.95 and max(missing["angles_deg"]) > 10


def test_label_directions_recover_the_directions_that_move_each_label_alone():
    """Slices whose two labels are linear in their latents along non-orthogonal directions: the fit returns the
    direction that moves each label and holds the other, and scores the fit on held-out slices."""
    d = 6
    gen = torch.Generator().manual_seed(2)
    B = torch.tensor([[1.0, 0.5, 0, 0, 0, 0], [0.6, 0, 1.0, 0, 0, 0]], dtype=torch.float64)
    z = torch.randn(300, d, generator=gen, dtype=torch.float64)
    labels = z @ B.t() + 0.01 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    slices = [(z[i].float(), labels[i].float()) for i in range(300)]      # the "image" is the latent itself

    directions, info = subspace.label_directions(lambda x: x, slices, ["a", "b"], count=240)
    assert info["slices"] == 240 and min(info["fit_r2"].values()) > 0.99
    moved = directions.double() @ B.t()                                   # each direction's change of each label
    assert moved[0, 1].abs() < 1e-2 and moved[1, 0].abs() < 1e-2 and moved[0, 0] > 0 and moved[1, 1] > 0
    with pytest.raises(ValueError, match="constant column"):
        subspace.label_directions(lambda x: x, [(z[i].float(), torch.tensor([1.0, labels[i, 1]])) for i in range(60)],
                                  ["a", "b"], count=60)
