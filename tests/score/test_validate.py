"""The scorer (latentct/score/scoring.py), the known-answer sweeps (latentct/score/validate.py), the factor oracle
(latentct/score/oracle.py) and the supervised ceiling (latentct/discover/baselines.py: supervised)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentct.data import phantom
from latentct.data.phantom import FACTORS
from latentct.data.slices import hu_to_unit, parse_window, unit_to_hu
from latentct.discover.baselines import supervised
from latentct.generators.interface import generator_info
from latentct.score import anatomy, validate
from latentct.score import oracle as oracle_stage
from latentct.score.scoring import line_effects
from latentct.util.settings import UserError, parse_settings

# ------------------------------------------------------------------------------------------ noise floors

def test_noise_floors_are_mean_plus_two_sd_over_disjoint_groups_of_unmoved_factors():
    """Readings with a known noise level: a factor a sweep held still reads pure noise of SD 0.05 per sample.
    The floor is computed on disjoint groups of the scorer's sample count, never on factors the sweep moved."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.linspace(-1, 1, 5)
    values = 0.05 * torch.randn(6, 5, 48, 6, generator=gen)
    moved = torch.eye(6, dtype=torch.bool)
    for k in range(6):
        values[k, :, :, k] += 3 * eps[:, None]
    values[0, :, :, 1] += 3 * eps[:, None]     # sweep 0 also moves factor 1: not part of factor 1's floor
    moved[0, 1] = True
    out = validate.noise_floors([(values, moved)], eps, samples=16)
    assert out["floor_values"]["y_offset"] == 4 * 3 and out["floor_values"]["z_position"] == 5 * 3  # 48 / 16 groups
    by_hand = []
    for s in range(1, 6):                                               # factor 0 held still in sweeps 1-5
        for g in range(3):
            by_hand.append(line_effects(values[s:s + 1, :, g * 16:(g + 1) * 16], eps)[1][0, 0])
    assert out["noise_floor"]["z_position"] == pytest.approx(np.mean(by_hand) + 2 * np.std(by_hand, ddof=1))
    assert all(0 < v < 0.2 for v in out["noise_floor"].values())       # noise, not the moved factor's 6
    fewer = validate.noise_floors([(values, moved)], eps, samples=4)   # fewer samples: noisier slopes, higher floor
    assert fewer["noise_floor"]["width"] > out["noise_floor"]["width"]
    assert out["samples"] == 16 and fewer["samples"] == 4
    # more samples asked than the sweeps hold: one group of all 48, recorded as 48 (the scorer then refuses
    # these floors for 64 samples instead of taking a floor measured on fewer patients for theirs)
    assert validate.noise_floors([(values, moved)], eps, samples=64)["samples"] == 48


def test_attainable_level_is_the_median_share_a_clean_sweep_keeps():
    eps = torch.linspace(-1, 1, 5)
    values = torch.zeros(6, 5, 32, 6)
    for k in range(6):
        values[k, :, :, k] = eps[:, None]
    values[2, :, :, 3] = eps[:, None]            # through a blurring generator rotation drags thickness along
    kept = validate.attainable(values, eps, np.zeros(6), samples=16)
    assert kept["rotation"] == pytest.approx(0.5) and kept["width"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ known-answer sweeps

def _settings(seed, **kw):
    return validate.Settings(output="unused", seed=seed, image_size=64, patients=6, pair_patients=2, frames=5, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_known_answer_sweeps_score_right_with_exact_factors(seed):
    """The renderer's exact factors in place of the oracle: every sweep goes to its own factor, cleanly, every
    pair has its two factors on top, and the anatomy report labels at least 5 of 6 factors as declared."""
    result = validate.validate(_settings(seed))
    for f, sweep in result["sweeps"].items():
        assert sweep["attributed"] == f and sweep["leakage"] <= validate.LEAKAGE_TARGET, (f, sweep)
    assert all(p["ok"] for p in result["pairs"]) and len(result["pairs"]) == 15
    assert result["checks"]["labels_ok"] >= 5, {f: s["label"] for f, s in result["sweeps"].items()}
    # the label is the text a user sees (report.label's rule): a pure shift and a pure roll are named alone; a
    # label that names one measurement names the one it leads with; the others read as mixtures
    sweeps = result["sweeps"]
    assert sweeps["y_offset"]["single"] and sweeps["y_offset"]["label"].startswith("vertical position")
    assert sweeps["rotation"]["single"] and sweeps["rotation"]["label"].startswith("rotation")
    for f, sweep in sweeps.items():
        name = anatomy.MEASURES[sweep["leads_with"]][0]
        assert sweep["label"].startswith(name if sweep["single"] else f"mixture: {name} "), (f, sweep)
    assert result["checks"]["labels_single"] == sum(s["single"] and s["leads_with"] == s["expected_label"]
                                                    for s in sweeps.values()) >= 2
    assert result["checks"]["passed"]
    assert sum(result["confusion"]["rotation"].values()) == 6
    # exact factors move only their own factor: a factor a sweep held still reads as a flat line, floor 0 (a
    # sweep's own factor left in its floor would make it large); 6 and 2 patients per sweep hold floors for 2
    assert max(result["noise_floor"].values()) < 1e-6 and result["samples"] == 2
    assert result["minimum_effect"]["rotation"]["unit"] == "deg"


def test_a_sweep_moves_only_its_factor():
    hu_a, exact_a = validate.render_sweep((0, ("rotation",), 0, 3, 64, 32))
    assert exact_a[:, 2].tolist() == pytest.approx([-15, 0, 15]) and np.ptp(exact_a[:, [0, 1, 3, 4, 5]], 0).max() == 0
    assert not np.array_equal(hu_a[0], hu_a[-1])
    _, exact_b = validate.render_sweep((0, ("z_position", "breast_size"), 0, 3, 64, 32))
    assert exact_b[:, 0].tolist() == pytest.approx([0.1, 0.5, 0.9])
    _, exact_z = validate.render_sweep((0, ("z_position",), 1, 3, 64, 32))
    assert (exact_z[:, 5] == 0).all()  # z sweeps on patients without breasts


# ------------------------------------------------------------------------------------------ the oracle

def test_oracle_learns_cached_and_named_by_hash(tiny_oracle, capsys):
    cfg, path, r2 = tiny_oracle
    assert path.parent.name == "32px_hu-1000_2000_render64_phantom1_seed0_w8" and set(r2) == set(FACTORS)
    assert r2["width"] > 0.5 and r2["y_offset"] > 0.5  # even 150 tiny steps read the body's size and height
    oracle = oracle_stage.load_oracle(path)
    before = path.stat().st_mtime_ns
    assert oracle_stage.main(cfg) == oracle.r2 and path.stat().st_mtime_ns == before  # reused, not retrained
    assert "reused" in capsys.readouterr().out and len(oracle.sha256) == 64
    hu, targets = oracle_stage.render_slices(8, 32, seed=5, stream=9, render_size=64)
    read = oracle.read(oracle_stage.hu_to_unit(hu, "default"))
    assert read.shape == (8, 6) and torch.isfinite(read).all()
    with pytest.raises(UserError, match="32 px"):
        oracle.read(torch.zeros(1, 1, 64, 64))


def test_the_attainable_level_through_a_generator(tiny_oracle):
    """What a clean change keeps through a generator: through the identity it is what the rendered sweeps show."""
    oracle = oracle_stage.load_oracle(tiny_oracle[1])
    cfg = validate.Settings(image_size=32, render_size=64, patients=4, pair_patients=1, frames=3, scored_samples=2)
    result = validate.validate(cfg, oracle.read_std, through=lambda x: x, regenerate=lambda x: x * 0.0)
    assert set(result["attainable"]) == {"vae", "dcgan"} and set(result["attainable"]["vae"]) == set(FACTORS)
    assert all(v == 0 for v in result["attainable"]["dcgan"].values())  # a blank image keeps nothing of any factor
    assert max(result["attainable"]["vae"].values()) > 0


def test_the_fit_and_the_score_oracle_differ_in_weights_slices_and_cache_key(tiny_oracle, tmp_path):
    score_cfg, score_path, _ = tiny_oracle
    fit_cfg = oracle_stage.Settings(image_size=32, root=score_cfg.root, render_size=64, train_slices=200,
                                    test_slices=100, steps=20, batch_size=32, width=12, seed=1)
    oracle_stage.main(fit_cfg)
    fit_path = oracle_stage.folder_for(fit_cfg) / "oracle.pt"
    assert fit_path.parent != score_path.parent and fit_path.parent.name.endswith("_seed1_w12")
    score, fit = oracle_stage.load_oracle(score_path), oracle_stage.load_oracle(fit_path)
    assert score.sha256 != fit.sha256 and fit.model.features[0].out_channels == 12
    assert score.model.features[0].out_channels == 8
    hu_score, _ = oracle_stage.render_slices(4, 32, seed=score_cfg.seed, stream=1, render_size=64)
    hu_fit, _ = oracle_stage.render_slices(4, 32, seed=fit_cfg.seed, stream=1, render_size=64)
    assert not torch.equal(hu_score, hu_fit)  # another seed: other training slices
    agree = validate.agreement(score, fit, validate.Settings(image_size=32, render_size=64), count=40)
    assert set(agree) == set(FACTORS) and all(v <= 1 for v in agree.values())


def test_augmentation_looks_generated_and_keeps_the_slice():
    hu, _ = oracle_stage.render_slices(6, 32, seed=2, stream=1, render_size=64)
    x = oracle_stage.hu_to_unit(hu, "default")
    y = oracle_stage.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    body = x > -0.6                              # the body stays where it was: the factors are geometry
    assert (y[body] > y[~body].mean()).float().mean() > 0.9
    sharp = lambda im: (im[..., 1:, :] - im[..., :-1, :]).abs().mean()  # noqa: E731
    assert sharp(y) < sharp(x)                   # on average blurred, as a VAE draws


def test_partial_slopes_hold_the_other_factors_and_mask_each_column_on_its_own():
    gen = torch.Generator().manual_seed(0)
    factors = torch.randn(40, 2, generator=gen)
    values = torch.stack([0.5 * factors[:, 0] + 3 * factors[:, 1] + 7,   # moves with both: 0.5 and 3, not a mix
                          2 * factors[:, 1] - 1], 1)
    values[3, 0] = values[5, 1] = float("nan")                          # each column loses its own row only
    assert torch.allclose(validate.partial_slopes(values, factors).float(), torch.tensor([[0.5, 3.0], [0.0, 2.0]]),
                          atol=1e-5)
    few = torch.full((40, 1), float("nan"))
    few[:4, 0] = 1.0                                                    # too few rows: no number, not a 0
    assert torch.isnan(validate.partial_slopes(few, factors)).all()


def test_kept_share_credits_a_factor_only_with_its_own_change():
    """A measurement that moves with factor 0 and factor 1 on crisp images; the "generated" images keep half of
    factor 0's change and all of factor 1's: the share kept is 0.5 and 1, however the two mix."""
    gen = torch.Generator().manual_seed(1)
    factors = torch.randn(200, 2, generator=gen)
    crisp = torch.stack([factors[:, 0] + 4 * factors[:, 1], factors[:, 1]], 1)
    generated = torch.stack([0.5 * factors[:, 0] + 4 * factors[:, 1], factors[:, 1]], 1)
    generated[7, 0] = float("nan")
    assert torch.allclose(validate.kept_share(generated, crisp, factors).float(), torch.tensor([0.5, 1.0]), atol=1e-5)


@pytest.mark.parametrize("vae", ["identity", "mean image", "half size"])
def test_the_kept_shares_tell_a_vae_that_draws_less_from_an_oracle_that_reads_less(tiny_oracle, monkeypatch, vae):
    """A "VAE" that returns its input keeps every change, read and drawn; one that returns the mean image keeps
    none; one that draws the body at half its size about the centre keeps half of its thickness and width."""
    def half(x):
        small = torch.nn.functional.interpolate(x + 1, scale_factor=0.5, mode="area")
        pad = (x.shape[-1] - small.shape[-1]) // 2
        return torch.nn.functional.pad(small, (pad,) * 4) - 1

    fakes = {"identity": lambda x: x, "mean image": lambda x: x.mean(0, keepdim=True).expand_as(x).clone(),
             "half size": half}
    monkeypatch.setattr(validate, "reconstruction", lambda path, oracle: fakes[vae])
    oracle = oracle_stage.load_oracle(tiny_oracle[1])
    cfg = validate.Settings(image_size=32, render_size=64, probe_slices=40, probe_steps=3)
    r2, bound, kept = validate.generated_r2(oracle, "unused.pt", cfg, count=80, draws=20)
    assert set(kept) == set(FACTORS)
    for f in FACTORS:
        k = kept[f]
        assert k["measurement"] == validate.EXPECTED_LABELS[f] and k["draws"] == 20
        if vae == "identity":
            assert k["read"] == pytest.approx(1.0) and k["drawn"] == pytest.approx(1.0)
            assert k["read_interval"] == pytest.approx([1.0, 1.0]) and k["drawn_interval"] == pytest.approx([1.0, 1.0])
        if vae == "mean image":
            assert abs(k["read"]) < 1e-3 and abs(k["drawn"]) < 1e-3 and r2[f] <= 0
    if vae == "half size":
        for f in ("thickness", "width"):
            assert 0.35 < kept[f]["drawn"] < 0.65, (f, kept[f])
            low, high = kept[f]["drawn_interval"]
            assert low <= kept[f]["drawn"] <= high


def test_the_oracle_reading_bench_augmentations_remove_detail_and_keep_the_body():
    from bench.oracle_reading import AUGMENTED, _median, augmentation, pca_basis

    x = -torch.ones(8, 1, 32, 32)
    x[:, :, 8:24, 6:26] = 0.2                      # a body with a sharp edge
    x[:, :, 15, 15] = 1.0                          # and one bright vessel-sized dot inside it
    cleaned = _median(x, 3)
    assert torch.equal(cleaned[:, :, 15, 15], torch.full((8, 1), 0.2))       # the dot is gone
    assert torch.equal(cleaned[:, :, 8:24, 6:26][:, :, 1:-1, 1:-1].unique(), torch.tensor([0.2]))
    assert torch.equal(cleaned[:, :, :, 0], x[:, :, :, 0]) and cleaned[0, 0, 16, 6] == 0.2  # the edge stays
    body = x > -0.6
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    plain = x.clone()
    plain[:, :, 15, 15] = 0.2                      # the second render: the same slice without its fine detail
    for name in AUGMENTED:
        given = torch.cat([x, plain], 1) if name in ("plain", "autoencoder") else x
        y = augmentation(name, pca_basis(noisy))(given, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
        assert (y[body] > y[~body].mean()).float().mean() > 0.9, name


def test_plain_renders_lose_the_fine_anatomy_and_keep_everything_else():
    """fine=False leaves out vessels, ribs and sternum: the same patients, z, noise and outline; the bench's
    ``plain`` variant trains on a random half of them, and ``both_oracles`` averages two oracles' readings."""
    from bench.oracle_reading import MeanReader, either
    from latentct.score.anatomy import measure

    hu, targets = oracle_stage.render_slices(6, 64, seed=3, stream=1, render_size=64)
    plain, same = oracle_stage.render_slices(6, 64, seed=3, stream=1, render_size=64, fine=False)
    assert torch.equal(targets, same)
    changed = hu != plain
    assert 0.005 < changed.float().mean() < 0.2                   # detail, not the slice, is what differs
    assert hu[changed].float().mean() > plain[changed].float().mean() + 200   # bright bone and vessels gone
    for m in ("thickness", "width", "centroid_y"):
        assert torch.equal(measure(hu)[m], measure(plain)[m]), m
    p = phantom.sample_patient(np.random.default_rng(1))
    chest = phantom.render_slice(p, 0.3, 64, np.random.default_rng(0))
    bare = phantom.render_slice(p, 0.3, 64, np.random.default_rng(0), fine=False)
    assert (chest >= 650).sum() > (bare >= 650).sum()              # ribs are bone; without them only the spine is
    lung = bare < -500                                              # the lungs (and air) of the bare slice
    assert (chest[lung] > bare[lung] + 300).sum() > 10              # vessels were drawn there, bright in the lung
    g = phantom.slice_geometry(p, 0.3)
    across_mm, down_mm = phantom.body_to_image(p, 0.0, -g.inner_b + 6.0)  # the sternum's centre, from the centre
    row, col = (int((c + phantom.FOV_MM / 2) / (phantom.FOV_MM / 64)) for c in (down_mm, across_mm))
    assert 0.08 < 0.3 < p.diaphragm and chest[row, col] > bare[row, col] + 300   # and the sternum is gone
    x = torch.stack([torch.full((400, 2, 2), -1.0), torch.full((400, 2, 2), 1.0)], 1)
    picked = either(x, torch.Generator().manual_seed(0))
    assert picked.shape == (400, 1, 2, 2) and 0.4 < (picked[:, 0, 0, 0] > 0).float().mean() < 0.6

    class Reads:
        window = (-1000.0, 2000.0)

        def __init__(self, value):
            self.value = value

        def read(self, images):
            return torch.full((len(images), 6), self.value)
    both = MeanReader([Reads(1.0), Reads(3.0)], (-1000.0, 2000.0))
    assert torch.equal(both.read(torch.zeros(2, 1, 4, 4)), torch.full((2, 6), 2.0))
    with pytest.raises(UserError, match="HU window"):
        MeanReader([Reads(1.0), Reads(3.0)], (-1350.0, 150.0))


def test_copies_share_the_factors_and_the_nuisance_average_mixes_them():
    from bench.oracle_reading import nuisance_average
    from latentct.score.anatomy import measure

    hu, targets = oracle_stage.render_slices(6, 64, seed=3, stream=1, render_size=64, copies=2)
    single, same = oracle_stage.render_slices(6, 64, seed=3, stream=1, render_size=64)
    assert hu.shape == (6, 2, 64, 64) and single.shape == (6, 1, 64, 64) and torch.equal(same[0], targets[0])
    first, second = (measure(hu[:, c:c + 1]) for c in range(2))
    for m in ("thickness", "width", "centroid_y"):                 # the outline is the factors': it agrees
        assert (first[m] - second[m]).abs().max() <= 2.0, (m, first[m], second[m])
    assert (hu[:, 0].float() - hu[:, 1].float()).abs().mean() > 20  # the inside is another patient's
    x = torch.stack([torch.full((5, 4, 4), -1.0), torch.full((5, 4, 4), 1.0)], 1)    # (5, 2, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(nuisance_average(x, gen, share=0.0), x[:, :1])
    mixed = nuisance_average(x, gen, share=1.0)
    assert mixed.shape == (5, 1, 4, 4) and (mixed > -1).all() and (mixed < 1).all()
    assert torch.allclose(mixed, mixed[:, :, :1, :1].expand_as(mixed))                  # one weight per slice


def test_oracle_from_another_phantom_version_is_refused(tiny_oracle, tmp_path):
    state = torch.load(tiny_oracle[1], weights_only=True)
    state["phantom_version"] = phantom.PHANTOM_VERSION + 1
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(UserError, match="phantom version"):
        oracle_stage.load_oracle(tmp_path / "old.pt")


def test_validate_command_writes_the_schema(tiny_oracle, tmp_path):
    cfg = parse_settings(validate.Settings, ["--output", str(tmp_path / "v"), "--image-size", "32", "--oracle",
                                             str(tiny_oracle[1]), "--patients", "2", "--pair-patients", "1",
                                             "--frames", "3", "--render-size", "64"])
    validate.main(cfg)
    out = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert out["image_size"] == 32 and out["seed"] == 0 and len(out["oracle_sha256"]) == 64
    assert set(out["oracle"]) == set(FACTORS)
    assert all({"r2_generated", "bound", "slope_generated", "agreement"} <= set(v) for v in out["oracle"].values())
    assert set(out["sweeps"]) == set(FACTORS)
    assert {"attributed", "leakage", "label", "expected_label"} <= set(out["sweeps"]["rotation"])
    assert all(set(p) >= {"factors", "top_two"} for p in out["pairs"])
    assert set(out["noise_floor"]) == set(FACTORS) and all(v > 0 for v in out["noise_floor"].values())
    oracle = oracle_stage.load_oracle(tiny_oracle[1])
    k = FACTORS.index("width")                    # the smallest recovered effect, in mm: 2 floors x the width's SD
    assert out["minimum_effect"]["width"] == {"value": pytest.approx(2 * out["noise_floor"]["width"] *
                                                                     float(oracle.std[k])), "unit": "mm"}


# ------------------------------------------------------------------------------------------ supervised ceiling

class FactorToy(nn.Module):
    """Images that spell out six factors linearly in z (one pixel each), and an oracle that reads them back."""

    latent_dim = 10

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.B = nn.Parameter(torch.randn(6, self.latent_dim, generator=gen), requires_grad=False)

    def forward(self, z):
        img = torch.zeros(len(z), 1, 4, 4)
        img[:, 0, 0, :4] = 0.1 * (z @ self.B.t())[:, :4]
        img[:, 0, 1, :2] = 0.1 * (z @ self.B.t())[:, 4:]
        return img


class ToyOracle:
    window = (-1000.0, 2000.0)

    def read(self, images):
        return torch.cat([images[:, 0, 0, :4], images[:, 0, 1, :2]], 1) * 10


def test_supervised_directions_move_one_factor_and_hold_the_others():
    toy = FactorToy()
    directions, info = supervised(toy, ToyOracle(), ToyOracle.window, samples=256)
    moved = directions @ toy.B.t()  # factor change per unit step along each direction
    assert torch.allclose(moved - torch.diag(torch.diagonal(moved)), torch.zeros(6, 6), atol=1e-4)
    assert (torch.diagonal(moved) > 0).all()
    assert all(v > 0.999 for v in info["fit_r2"].values())
    singular = torch.linalg.svdvals(toy.B)
    assert info["condition_number"] == pytest.approx(float(singular.max() / singular.min()), rel=1e-4)
    assert info["per_unit_shift"]["rotation"] == pytest.approx(float(moved[2, 2]), rel=1e-4)


def test_the_oracle_reading_bench_says_what_both_oracles_lacks_before_any_work(tmp_path):
    from bench.oracle_reading import Settings, main

    (tmp_path / "runs" / "r" / "vae").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "vae" / "generator.pt").write_bytes(b"never read: the check comes first")
    with pytest.raises(UserError, match="validation/config.json not found"):
        main(Settings(run="r", root=str(tmp_path), variants=["shipped", "both_oracles"]))
    (tmp_path / "Animations" / "r" / "validation").mkdir(parents=True)
    (tmp_path / "Animations" / "r" / "validation" / "config.json").write_text(json.dumps({"oracle": "o.pt"}))
    with pytest.raises(UserError, match="names no fit_oracle"):
        main(Settings(run="r", root=str(tmp_path), variants=["shipped", "both_oracles"]))


def test_the_oracle_reading_bench_trains_plain_on_each_slice_beside_its_bare_render(dataset, tiny_oracle, tmp_path,
                                                                                     monkeypatch):
    """End to end at tiny sizes: ``plain`` trains on (slice, the same slice without fine anatomy) pairs of the
    shipped slices, ``shipped`` on the slices alone, and ``both_oracles`` reads with the run's two oracles as the
    pipeline stored their paths (relative to the folder it ran in)."""
    import bench.oracle_reading as bench_reading
    from Training import TrainVAE

    run = tmp_path / "runs" / "r" / "vae"
    TrainVAE.main(parse_settings(TrainVAE.Settings, ["--data", str(dataset), "--output", str(run), "--steps", "2",
                                                     "--width", "8", "--batch-size", "8", "--latent-dim", "8",
                                                     "--log-every", "1"]))
    validation = tmp_path / "Animations" / "r" / "validation"
    validation.mkdir(parents=True)
    oracle_path = str(tiny_oracle[1])
    (validation / "config.json").write_text(json.dumps({"oracle": oracle_path, "fit_oracle": oracle_path}))
    seen, fit = {}, oracle_stage.fit_oracle

    def recording(cfg, slices, test, augmentation):
        seen[len(seen)] = slices
        return fit(cfg, slices, test, augmentation)

    monkeypatch.setattr(oracle_stage, "fit_oracle", recording)
    asked = []

    def standin(x, steps, seed):         # a known stand-in that depends on each slice: its mirror image, darker
        asked.append((steps, seed))
        return 0.5 * x.flip(-1) - 0.5

    monkeypatch.setattr(bench_reading, "standin_reconstructions", standin)
    out = bench_reading.main(bench_reading.Settings(run="r", root=str(tmp_path), steps=2, train_slices=6,
                                                    test_slices=4, count=4, width=4, render_size=64, standin_steps=2,
                                                    variants=["shipped", "plain", "autoencoder", "both_oracles"]))
    shipped, plain, auto = seen[0], seen[1], seen[2]
    assert asked == [(2, 0)] and out["standin_steps"] == 2
    window = parse_window(tuple(generator_info(str(run / "generator.pt"))["window"]))
    expected = unit_to_hu(standin(hu_to_unit(shipped[0], window), 2, 0), window).round().to(shipped[0].dtype)
    assert auto[0].shape == (6, 2, 32, 32) and torch.equal(auto[0][:, :1], shipped[0])
    assert torch.equal(auto[0][:, 1:], expected) and torch.equal(auto[1], shipped[1])  # each beside its own, in HU
    bare = oracle_stage.render_slices(6, 32, 0, 1, 64, fine=False)
    assert shipped[0].shape == (6, 1, 32, 32) and plain[0].shape == (6, 2, 32, 32)
    assert torch.equal(plain[0][:, :1], shipped[0]) and torch.equal(plain[0][:, 1:], bare[0])
    assert torch.equal(plain[1], shipped[1]) and not torch.equal(plain[0][:, 0], plain[0][:, 1])
    both = out["variants"]["both_oracles"]
    assert len(both["r2_generated_each"]) == 2 and both["r2_generated_each"][0] == both["r2_generated_each"][1]
    assert both["r2_generated"] == pytest.approx(both["r2_generated_each"][0])   # one oracle twice: its own reading
    assert len(both["r2_recalibrated"]) == len(both["r2_half"]) == 6


def test_the_stand_in_vae_learns_to_reconstruct_its_slices_the_same_way_for_a_seed():
    """bench.oracle_reading's ``autoencoder`` variant: the stand-in VAE trains on the slices it then reconstructs
    (closer after 40 steps than untrained, and each closer to its own slice than to another), in their range and
    shape, and a seed gives the same reconstructions."""
    from bench.oracle_reading import standin_reconstructions

    hu, _ = oracle_stage.render_slices(24, 32, seed=3, stream=1, render_size=64)
    x = hu_to_unit(hu, (-1350.0, 150.0))
    untrained, trained = standin_reconstructions(x, 0, 0), standin_reconstructions(x, 40, 0)
    assert trained.shape == x.shape and trained.min() >= -1 and trained.max() <= 1
    assert F.mse_loss(trained, x) < 0.7 * F.mse_loss(untrained, x)
    assert F.mse_loss(trained, x) < 0.5 * F.mse_loss(trained.roll(1, 0), x)  # each slice's own reconstruction
    assert torch.equal(trained, standin_reconstructions(x, 40, 0))
    assert not torch.equal(trained, standin_reconstructions(x, 40, 1))


def test_recalibrated_r2_undoes_scale_and_offset_but_not_noise():
    from bench.oracle_reading import recalibrated_r2

    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(400, 2, generator=gen)
    read = torch.stack([0.5 * truth[:, 0] + 3, truth[:, 1] + torch.randn(400, generator=gen)], 1)
    raw, (exact, noisy) = recalibrated_r2(read, truth)
    assert raw[0] < 0 and exact == pytest.approx(1.0)              # a line: all of it back, on the same half
    # unit noise on a unit spread: as read R2 about 0, and the best line (slope 1/2) gets back half, no more
    assert raw[1] == pytest.approx(0.0, abs=0.2) and noisy == pytest.approx(0.5, abs=0.08)
