import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from latentct.discover.baselines import coordinate_axes, pca, random_orthonormal, sefa
from latentct.discover.directions import (
    load_directions,
    make_shifts,
    recalibrated,
    reconstructor_accuracy,
    step_losses,
    unit_directions,
)
from latentct.generators.interface import load_generator
from latentct.models.deformator import Deformator, FixedDirections
from latentct.models.reconstructor import LeNet, ResNet18
from latentct.util.settings import UserError, parse_settings
from Training import TrainDirections

TINY = ["--batch-size", "16", "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000",
        "--rca-batches", "4", "--device", "cpu", "--directions-count", "8"]


def run_dirs(generator, out, *extra):
    cfg = parse_settings(TrainDirections.Settings, ["--generator", str(generator), "--output", str(out), *TINY,
                                                    *extra], presets=TrainDirections.PRESETS)
    return TrainDirections.main(cfg)


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ deformators

def test_deformator_properties():
    basis = torch.zeros(4, 6)
    basis[torch.arange(4), torch.tensor([0, 1, 2, 5])] = torch.tensor([2.0, -3.0, 0.5, 6.0])
    assert torch.equal(FixedDirections(torch.eye(6))(basis), basis)  # frozen axes: the original's "id" kind
    proj = Deformator("proj", 6, 6, random_init=True)
    assert torch.allclose(proj(basis).norm(dim=1), basis.norm(dim=1), atol=1e-5)
    ortho = Deformator("ortho", 6, 6, random_init=True)
    before = ortho.orthogonal_matrix().detach()
    opt = torch.optim.SGD(ortho.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # stays orthonormal while it learns
        opt.zero_grad()
        (ortho(torch.randn(8, 6, generator=gen))[:, 0] ** 2).sum().backward()
        opt.step()
    m = ortho.orthogonal_matrix().detach()
    assert not torch.allclose(m, before, atol=1e-3)
    assert torch.allclose(m @ m.t(), torch.eye(6), atol=1e-5)
    assert not FixedDirections(random_orthonormal(6, 4)).trainable and Deformator("proj", 4, 6).trainable
    assert torch.allclose(unit_directions(proj), proj(torch.eye(6)).detach())
    # the random-init flag is a real boolean: off means the identity start
    assert torch.equal(Deformator("linear", 6, 6, random_init=False).linear.weight.detach(), torch.eye(6))
    assert not torch.equal(Deformator("linear", 6, 6, random_init=True).linear.weight.detach(), torch.eye(6))
    # without a bias +eps and -eps are opposite; with one (trained away from zero) they are not
    plain = Deformator("linear", 6, 6)
    assert torch.allclose(plain(basis), -plain(-basis))
    biased = Deformator("linear", 6, 6, bias=True)
    with torch.no_grad():
        biased.linear.bias.fill_(0.3)
    assert not torch.allclose(biased(basis), -biased(-basis))
    with pytest.raises(ValueError, match="directions-count"):
        Deformator("ortho", 8, 6)


def test_shift_sampler_respects_min_shift():
    idx, eps, basis = make_shifts(1000, 5, 6.0, 0.5, "uniform", "cpu", torch.Generator().manual_seed(0))
    assert eps.abs().min() >= 0.5 and eps.abs().max() <= 6.0 and idx.max() < 5
    assert torch.equal(basis[torch.arange(1000), idx], eps) and (basis != 0).sum() == 1000


def test_reconstructors_return_logits_and_shift():
    x = torch.randn(3, 1, 64, 64)
    for net in (LeNet(7), ResNet18(7, width=8)):
        logits, shift = net(x, x)
        assert logits.shape == (3, 7) and shift.shape == (3,)
    # the second input matters (the original ResNet predictor overwrote it with the first)
    net = ResNet18(7, width=8).eval()
    assert not torch.allclose(net(x, x)[0], net(x, -x)[0])


# ------------------------------------------------------------------------------------------ the step

def test_fast_step_matches_the_original_losses_and_gradients(gan_run):
    G = load_generator(gan_run / "generator.pt")
    torch.manual_seed(0)
    z = torch.randn(8, G.latent_dim)
    idx, eps, basis = make_shifts(8, 6, 6.0, 0.5, "uniform", "cpu", torch.Generator().manual_seed(1))
    results = {}
    for form in ("naive", "split", "concat"):
        torch.manual_seed(3)
        deformator, recon = Deformator("proj", 6, G.latent_dim, random_init=True), LeNet(6)
        G.requires_grad_(form == "naive")  # the original computed (and discarded) G's weight gradients
        loss, *_ = step_losses(G, deformator, recon, z, idx, eps, basis, 1.0, 0.25, form)
        loss.backward()
        g_grads = [p.grad for p in G.parameters()]
        results[form] = (loss.detach(), deformator.linear.weight.grad.clone(), g_grads)
        G.zero_grad(set_to_none=True)
    assert all(g is not None for g in results["naive"][2])
    assert all(g is None for g in results["split"][2])
    for form in ("split", "concat"):
        assert torch.allclose(results[form][0], results["naive"][0], atol=1e-6)
        assert torch.allclose(results[form][1], results["naive"][1], atol=1e-6)


# ------------------------------------------------------------------------------------------ training

def test_learned_directions_beat_the_frozen_random_baseline(gan_run, tmp_path):
    # small shifts (|eps| <= 2) make the difference: random directions move the image too little to tell apart.
    # One seed is one draw (measured over seeds 0-3, BatchNorm statistics recalibrated: learned 0.59-0.77, mean
    # 0.66; random 0.50-0.57, mean 0.54): two seeds, means, half that gap.
    args = ["--steps", "250", "--eval-every", "250", "--rca-batches", "10", "--lr-deformator", "1e-3",
            "--lr-reconstructor", "1e-3", "--reconstructor-width", "4", "--batch-size", "32",
            "--directions-count", "16", "--shift-scale", "2", "--min-shift", "0.25"]
    learned, random = [], []
    for seed in ("0", "1"):
        learned.append(run_dirs(gan_run / "generator.pt", tmp_path / f"learned{seed}", *args, "--seed", seed)["rca"])
        random.append(run_dirs(gan_run / "generator.pt", tmp_path / f"random{seed}", *args, "--method", "random",
                               "--seed", seed)["rca"])
    assert sum(learned) / 2 > sum(random) / 2 + 0.06, (learned, random)
    assert min(learned) > 0.3  # chance is 1/16


def test_rca_does_not_read_the_batchnorm_averages_training_left(gan_run):
    """RCA recalibrates a copy's BatchNorm statistics on fresh pairs first: stale averages (as a fast learning rate
    leaves them) give the same copy, bit for bit, as clean ones, although in eval mode they change every logit; the
    copy's averages are the plain mean over the batches of each batch's statistics; the reconstructor given keeps
    its own averages and its mode."""
    G = load_generator(gan_run / "generator.pt").eval()
    deformator = FixedDirections(random_orthonormal(G.latent_dim, 4, seed=0))
    shift_args = dict(shift_scale=3.0, min_shift=0.5, distribution="uniform")
    gen = torch.Generator().manual_seed(7)
    pairs = []
    with torch.no_grad():
        for _ in range(3):
            z = torch.randn(16, G.latent_dim, generator=gen)
            _, _, basis = make_shifts(16, 4, generator=gen, device="cpu", **shift_args)
            pairs.append((None, G(z), G(z + deformator(basis))))
    torch.manual_seed(0)
    clean = LeNet(4, width=2)
    stale = LeNet(4, width=2)
    stale.load_state_dict(clean.state_dict())
    with torch.no_grad():
        for m in stale.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(0.01)
                m.num_batches_tracked.fill_(300)  # as 300 training steps leave it
    stale.train()
    _, x, shifted = pairs[0]
    with torch.no_grad():
        assert not torch.allclose(stale.eval()(x, shifted)[0], clean.eval()(x, shifted)[0], atol=1e-3)
    stale.train()
    copies = [recalibrated(r, pairs) for r in (clean, stale)]
    for (key, a), b in zip(copies[0].state_dict().items(), copies[1].state_dict().values()):
        assert torch.equal(a, b), key
    assert stale.training and torch.all(stale.features[1].running_mean == 5.0)   # left as it was given
    assert not copies[1].training and copies[1] is not stale

    with torch.no_grad():  # the first BatchNorm: the mean over the 3 batches of each batch's mean and variance
        seen = [stale.features[0](torch.cat([x, y], 1)) for _, x, y in pairs]
    means = torch.stack([v.mean((0, 2, 3)) for v in seen]).mean(0)
    variances = torch.stack([v.transpose(0, 1).flatten(1).var(1) for v in seen]).mean(0)
    assert torch.allclose(copies[1].features[1].running_mean, means, rtol=1e-4, atol=1e-6)
    assert torch.allclose(copies[1].features[1].running_var, variances, rtol=1e-4, atol=1e-6)

    rca = [reconstructor_accuracy(G, deformator, r, 3, 16, shift_args, "cpu") for r in (clean, stale)]
    assert rca[0] == rca[1]


def test_resume_continues_exactly(gan_run, tmp_path):
    run_dirs(gan_run / "generator.pt", tmp_path / "full", "--steps", "12", "--checkpoint-every", "6")
    run_dirs(gan_run / "generator.pt", tmp_path / "split", "--steps", "6", "--checkpoint-every", "6")
    run_dirs(gan_run / "generator.pt", tmp_path / "split", "--steps", "12", "--checkpoint-every", "6")
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full") if "loss" in r}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split") if "loss" in r}
    assert sorted(split) == list(range(1, 13))
    for step in range(7, 13):
        assert split[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7)
    a = torch.load(tmp_path / "full" / "directions.pt", weights_only=True)["matrix"]
    b = torch.load(tmp_path / "split" / "directions.pt", weights_only=True)["matrix"]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("extra", [
    ["--deformator", "ortho", "--directions-count", "32"],
    ["--deformator", "fc"],
    ["--deformator", "linear", "--deformator-bias"],
    ["--method", "random", "--directions-count", "32"],
    ["--reconstructor", "resnet", "--reconstructor-width", "8"],
    ["--method", "sefa"], ["--method", "pca"], ["--method", "coordinate"],
])
def test_every_deformator_and_method_writes_the_same_artifact(gan_run, tmp_path, extra):
    run_dirs(gan_run / "generator.pt", tmp_path / "run", "--steps", "3", "--eval-every", "3", *extra)
    directions, G = load_directions(tmp_path / "run" / "directions.pt")
    assert directions.matrix.shape == (directions.count, G.latent_dim) and directions.count in (8, 32)
    assert directions.rca is not None and 0 <= directions.rca <= 1
    k, eps = torch.tensor([0, 3, 3]), torch.tensor([2.0, 1.0, -1.0])
    shifts = directions.shifts(k, eps)
    assert shifts.shape == (3, G.latent_dim)
    if "fc" not in extra and "--deformator-bias" not in extra:  # the linear kinds: matrix rows are unit shifts
        assert torch.allclose(shifts, eps[:, None] * directions.matrix[k], atol=1e-5)


def test_artifact_names_its_generator(gan_run, tmp_path):
    run_dirs(gan_run / "generator.pt", tmp_path / "run", "--steps", "2", "--eval-every", "2")
    path = tmp_path / "run" / "directions.pt"
    other = tmp_path / "other.pt"
    other.write_bytes((gan_run / "generator.pt").read_bytes())
    load_directions(path, other)  # an identical copy is the same generator
    G = load_generator(other)
    with torch.no_grad():
        next(iter(G.parameters())).add_(1.0)
    torch.save(dict(torch.load(other, weights_only=True), state_dict=G.state_dict()), other)
    with pytest.raises(UserError, match="directions were found for generator"):
        load_directions(path, other)
    with pytest.raises(UserError, match="is missing"):
        load_directions(path, tmp_path / "gone.pt")


# ------------------------------------------------------------------------------------------ baselines

class LinearToy(nn.Module):
    """A linear toy generator with one planted dominant direction v."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(64, d, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        scales = torch.tensor([10.0] + [1.0] * (d - 1))
        self.latent_dim = d
        self.weight = nn.Parameter(u @ torch.diag(scales) @ v.t(), requires_grad=False)
        self.planted = v[:, 0]

    def first_layer(self, z):
        return z @ self.weight.t()

    def forward(self, z):
        return torch.tanh(self.first_layer(z)).reshape(-1, 1, 8, 8)


def test_sefa_recovers_a_planted_direction():
    toy = LinearToy()
    top = sefa(toy, 3)
    assert abs(float(top[0] @ toy.planted)) > 0.999
    assert torch.allclose(top @ top.t(), torch.eye(3), atol=1e-5)
    assert abs(float(pca(toy, 2, samples=4000)[0] @ toy.planted)) > 0.95  # GANSpace finds it too


def test_random_and_coordinate_baselines():
    r = random_orthonormal(8, 5, seed=1)
    assert torch.allclose(r @ r.t(), torch.eye(5), atol=1e-5)
    assert torch.equal(coordinate_axes(8, 3), torch.eye(8)[:3])


def test_a_stop_signal_during_the_final_rca_check_still_writes_the_directions(gan_run, tmp_path, monkeypatch):
    """SIGTERM while the last step's RCA is measured: the run finishes and writes directions.pt (stopping then
    would throw the finished directions away); a signal before the last step stops the run with 128 + 15."""
    import os
    import signal

    measure = TrainDirections.reconstructor_accuracy

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        return measure(*args, **kwargs)

    monkeypatch.setattr(TrainDirections, "reconstructor_accuracy", interrupted)
    result = run_dirs(gan_run / "generator.pt", tmp_path / "last", "--steps", "3", "--eval-every", "3")
    assert (tmp_path / "last" / "directions.pt").is_file() and 0 <= result["rca"] <= 1
    with pytest.raises(SystemExit) as stopped:  # the same signal in step 2 of 6: step 3 checkpoints and exits, no artifact
        run_dirs(gan_run / "generator.pt", tmp_path / "early", "--steps", "6", "--eval-every", "2")
    assert stopped.value.code == 128 + signal.SIGTERM and not (tmp_path / "early" / "directions.pt").exists()
    assert torch.load(tmp_path / "early" / "checkpoint.pt", weights_only=True)["step"] == 3  # the next step ends it


def test_directions_for_each_method_kind(gan_run):
    G = load_generator(gan_run / "generator.pt")
    cfg = parse_settings(TrainDirections.Settings, ["--generator", str(gan_run / "generator.pt"), *TINY])
    learned, args, method, extra = TrainDirections.directions_for(cfg, G, "cpu")
    assert learned.trainable and args["directions_count"] == 8 and method == "learned" and extra == {}
    cfg.method = "coordinate"
    fixed, args, method, _ = TrainDirections.directions_for(cfg, G, "cpu")
    assert not fixed.trainable and args is None and method == "coordinate"
    assert torch.equal(fixed.matrix, torch.eye(G.latent_dim)[:8])
