"""The discovery methods beyond Voynov & Babenko's: DisCo (Training/TrainDisCo.py), LatentCLR
(Training/TrainLatentCLR.py), the Jacobian-spectral method (latentct/discover/baselines.py: spectral), and the RCA of
frozen directions (Training/TrainDirections.py --method file)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from latentct.discover.baselines import spectral
from latentct.discover.directions import load_directions
from latentct.generators.features import default_layer, layer_features
from latentct.util.settings import UserError, parse_settings
from Training import TrainDirections, TrainDisCo, TrainLatentCLR


class BlobToy(nn.Module):
    """32 x 32 images of a bright square whose position is set by two planted latent directions; the other
    latent dimensions only add faint texture. Its first layer is linear, its second a nonlinearity."""

    latent_dim = 8

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
        self.register_buffer("basis", q)  # rows 0 and 1: the planted directions
        self.first = nn.Linear(8, 8, bias=False)
        with torch.no_grad():  # distinct gains: the planted rows are the first layer's top singular directions
            self.first.weight.copy_(torch.diag(torch.tensor([1.0, 0.9, 0.5, 0.5, 0.3, 0.3, 0.2, 0.2])) @ q)
        self.act = nn.Tanh()

    def forward(self, z):
        return self.draw(self.act(self.first(z)))  # coordinates along the planted basis, squashed, drawn

    def draw(self, c):
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx, cy = 16 + 10 * c[:, 0].view(-1, 1, 1), 16 + 10 * c[:, 1].view(-1, 1, 1)
        blob = torch.sigmoid(2 * (5 - torch.maximum((xx - cx).abs(), (yy - cy).abs())))
        texture = 0.05 * torch.sin(0.5 * xx * c[:, 2].view(-1, 1, 1) + 0.5 * yy * c[:, 3].view(-1, 1, 1))
        return (2 * blob - 1 + texture).clamp(-1, 1)[:, None]


class TwoBlobToy(nn.Module):
    """32 x 32 images of two squares, left and right, whose brightness two planted latent directions set; the
    other latent directions change nothing."""

    latent_dim = 6

    def __init__(self):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("basis", q)

    def forward(self, z):
        a, b = torch.tanh(0.4 * z @ self.basis[0]), torch.tanh(0.4 * z @ self.basis[1])
        img = -torch.ones(len(z), 1, 32, 32)
        img[:, 0, 10:22, 3:13] = a.view(-1, 1, 1)
        img[:, 0, 10:22, 19:29] = b.view(-1, 1, 1)
        return img


def _best_cos(directions: torch.Tensor, planted: torch.Tensor) -> float:
    return float((torch.nn.functional.normalize(directions, dim=1) @ planted).abs().max())


def _save_toy(tmp_path, kind="blobtoy", toy=BlobToy) -> Path:
    """The toy as a generator file (the trainers load generators from files)."""
    from latentct.generators.interface import save_generator

    path = tmp_path / f"{kind}.pt"
    save_generator(path, kind, toy(), {}, "default", "")
    return path


@pytest.fixture
def toy_file(tmp_path, monkeypatch):
    from latentct.generators import interface as generators

    monkeypatch.setitem(generators.KINDS, "blobtoy", BlobToy)
    return _save_toy(tmp_path)


@pytest.fixture
def two_blob_file(tmp_path, monkeypatch):
    from latentct.generators import interface as generators

    monkeypatch.setitem(generators.KINDS, "twoblob", TwoBlobToy)
    return _save_toy(tmp_path, "twoblob", TwoBlobToy)


def test_spectral_is_sefa_on_a_linear_layer_and_finds_the_planted_directions():
    toy = BlobToy().eval().requires_grad_(False)
    linear, info = spectral(toy, 2, layer="first", samples=8)
    assert torch.allclose((linear @ toy.basis[:2].t()).abs(), torch.eye(2), atol=1e-4) and info["solver"] == "exact"
    deep, _ = spectral(toy, 2, layer="act", samples=64)
    assert _best_cos(deep, toy.basis[0]) > 0.9 or _best_cos(deep, toy.basis[1]) > 0.9
    big, info = spectral(toy, 2, layer="act", samples=64, exact_up_to=4)
    assert info["solver"].startswith("subspace") and torch.allclose((big @ deep.t()).abs().diagonal(),
                                                                    torch.ones(2), atol=1e-3)


def test_layer_hooks_stop_at_the_layer_and_name_bad_layers():
    toy = BlobToy()
    assert layer_features(toy, "first")(torch.zeros(3, 8)).shape == (3, 8)
    with pytest.raises(UserError, match="--feature-layer"):
        layer_features(toy, "nope")
    from latentct.models.dcgan import Generator

    assert default_layer(Generator(8, 32, 8)) == "main.5"


def _run(module, toy_file, out, *extra):
    cfg = parse_settings(module.Settings, ["--generator", str(toy_file), "--output", str(out), "--device", "cpu",
                                           "--log-every", "1", "--checkpoint-every", "4", "--sample-every", "1000",
                                           *extra], presets=getattr(module, "PRESETS", None))
    return module.main(cfg)


def test_latentclr_finds_a_planted_direction(toy_file, tmp_path):
    _run(TrainLatentCLR, toy_file, tmp_path / "clr", "--directions-count", "4", "--batch-size", "16",
         "--steps", "150", "--feature-layer", "act", "--alpha", "0.5", "--milestones", "100", "140")
    directions, _ = load_directions(tmp_path / "clr" / "directions.pt")
    toy = BlobToy()
    assert directions.method == "latentclr" and directions.matrix.shape == (4, 8)
    assert max(_best_cos(directions.matrix, toy.basis[i]) for i in range(2)) > 0.9


def test_disco_finds_the_planted_directions(two_blob_file, tmp_path):
    _run(TrainDisCo, two_blob_file, tmp_path / "disco", "--deformator", "proj", "--directions-count", "2",
         "--encoder-width", "4", "--code-size", "8", "--positives", "8", "--negatives", "16", "--batch-size", "8",
         "--steps", "800", "--lr", "1e-3", "--shift-scale", "3")
    directions, _ = load_directions(tmp_path / "disco" / "directions.pt")
    toy = TwoBlobToy()
    assert directions.method == "disco" and (tmp_path / "disco" / "encoder.pt").is_file()
    # What a direction does to the image is its part in the planted plane (the rest changes nothing): each
    # direction should move one square only, and the two directions different squares.
    effective = torch.nn.functional.normalize(directions.matrix @ toy.basis[:2].t(), dim=1).abs()
    assert effective.max(1).values.min() > 0.95 and set(effective.argmax(1).tolist()) == {0, 1}, effective


@pytest.mark.parametrize("module, extra", [
    (TrainLatentCLR, ["--directions-count", "3", "--batch-size", "4", "--milestones", "3", "6",
                      "--feature-layer", "act"]),
    (TrainDisCo, ["--deformator", "proj", "--directions-count", "3", "--encoder-width", "2", "--code-size", "4",
                  "--positives", "4", "--negatives", "4", "--batch-size", "4"]),
])
def test_trained_methods_resume_exactly(toy_file, tmp_path, module, extra):
    _run(module, toy_file, tmp_path / "full", "--steps", "8", *extra)
    _run(module, toy_file, tmp_path / "split", "--steps", "4", *extra)
    _run(module, toy_file, tmp_path / "split", "--steps", "8", *extra)  # continues from step 4
    full = load_directions(tmp_path / "full" / "directions.pt")[0].matrix
    split = load_directions(tmp_path / "split" / "directions.pt")[0].matrix
    assert torch.allclose(full, split, atol=1e-6)
    losses = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text()
                                                              .splitlines()) if "loss" in r}
    assert losses("full") == pytest.approx(losses("split"), rel=1e-6)


def test_frozen_directions_get_their_rca_measured_like_a_baseline(toy_file, tmp_path):
    _run(TrainLatentCLR, toy_file, tmp_path / "clr", "--directions-count", "3", "--batch-size", "4", "--steps", "3",
         "--feature-layer", "act")
    _run(TrainDirections, toy_file, tmp_path / "rca", "--method", "file", "--directions-file",
         str(tmp_path / "clr" / "directions.pt"), "--directions-count", "3", "--steps", "4", "--batch-size", "8",
         "--eval-every", "4", "--rca-batches", "2", "--reconstructor-width", "1")
    measured, _ = load_directions(tmp_path / "rca" / "directions.pt")
    source, _ = load_directions(tmp_path / "clr" / "directions.pt")
    assert measured.method == "latentclr" and 0 <= measured.rca <= 1 and source.rca is None
    assert torch.equal(measured.matrix, source.matrix)
    with pytest.raises(UserError, match="--directions-file"):
        parse_settings(TrainDirections.Settings, ["--method", "file"])


class TimeFirstToy(BlobToy):
    """BlobToy behind a time-embedding MLP of a constant t, as in a diffusion model's UNet: the first two layers
    with parameters that a forward pass calls do not depend on z. ``mix`` (the identity) follows ``first``."""

    def __init__(self):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 8))
        self.mix = nn.Linear(8, 8)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(8))
            self.mix.bias.zero_()

    def forward(self, z):
        t = self.time(torch.ones(1, 1, device=z.device))
        return self.draw(self.act(self.mix(self.first(z)) + 0 * t))


class ToySampler(nn.Module):
    """A DDIM-like sampler: z is x_T (1 x 8 x 8), three denoising steps of a small conv net with a time
    embedding; every layer runs once per step."""

    latent_dim = 64

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time = nn.Linear(1, 4)
        self.conv_in, self.conv_out = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, z):
        x = z.reshape(-1, 1, 8, 8)
        for t in (0.9, 0.5, 0.1):
            h = torch.relu(self.conv_in(x) + self.time(torch.full((1, 1), t))[:, :, None, None])
            x = x - 0.1 * self.conv_out(h)
        return x.tanh()


def test_first_layer_methods_hook_the_first_layer_that_depends_on_z():
    from latentct.discover.baselines import pca, sefa

    toy = TimeFirstToy().eval().requires_grad_(False)
    assert torch.allclose((sefa(toy, 2) @ toy.basis[:2].t()).abs(), torch.eye(2), atol=1e-4)  # not the axes
    assert ((pca(toy, 2) @ toy.basis[:2].t()).abs().diagonal() > 0.99).all()
    directions, info = spectral(toy, 2, samples=8)  # was: 'NoneType' object has no attribute 'double'
    assert info["layer"] == "mix" and torch.allclose((directions @ toy.basis[:2].t()).abs(), torch.eye(2), atol=1e-4)
    with pytest.raises(UserError, match="^--feature-layer: the output of 'time.2' does not depend on z"):
        spectral(toy, 2, layer="time.2", samples=8)


def test_first_layer_methods_refuse_a_sampling_loop():
    from latentct.discover.baselines import sefa

    sampler = ToySampler().eval().requires_grad_(False)
    with pytest.raises(UserError, match=r"^SeFa and PCA: 'conv_in', the first layer whose output depends on z, "
                                        r"runs 3 times per forward pass \(a sampling loop\)"):
        sefa(sampler, 4)
