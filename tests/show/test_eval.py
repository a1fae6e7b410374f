import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
import torch.nn as nn

import EvalDirections
from latentct.data.phantom import FACTORS
from latentct.discover.directions import Directions
from latentct.generators.embed import embed
from latentct.generators.interface import load_generator
from latentct.score.report import describe, sweep
from latentct.show.render import direction_gif, grid_gif, sweep_shifts
from latentct.util.settings import UserError, parse_settings

SMALL = ["--frames", "9", "--report-samples", "4", "--report-shifts", "5", "--null-sets", "3",
         "--null-pool", "16", "--real-slices", "1", "--real-directions", "3", "--embed-steps", "5",
         "--grid-samples", "2", "--group", "5"]


class EllipseToy(nn.Module):
    """A toy generator: z0 moves the body down, z1 rolls it, z2 grows the lungs (smooth edges)."""

    latent_dim = 4

    def forward(self, z):
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        cy = 32 + 1.5 * z[:, 0].view(-1, 1, 1)
        t = torch.deg2rad(5.0 * z[:, 1]).view(-1, 1, 1)
        u = (xx - 32) * torch.cos(t) + (yy - cy) * torch.sin(t)
        v = -(xx - 32) * torch.sin(t) + (yy - cy) * torch.cos(t)
        body = torch.sigmoid(4 * (1 - (u / 22) ** 2 - (v / 13) ** 2))
        r = (5 + 0.6 * z[:, 2]).clamp_min(0.5).view(-1, 1, 1)
        lungs = sum(torch.sigmoid(3 * (r - ((u + s * 9) ** 2 + v ** 2).sqrt())) for s in (-1, 1))
        tissue = -0.307  # 40 HU in the default window
        img = -1 + body * (1 + tissue) - body * lungs * (1 + tissue)
        return img[:, None]


def toy_directions(count=3):
    matrix = torch.eye(4)[:count]
    return Directions({"method": "coordinate", "matrix": matrix, "deformator": None, "generator": {"path": "toy"},
                       "rca": None}, Path("toy"))


def test_planted_directions_are_labelled_correctly():
    G, d = EllipseToy(), toy_directions()
    eps = torch.linspace(-3, 3, 7)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    rows = describe(sweep(G, d, [0, 1, 2], eps, z), eps, (-1000, 2000), 2.0, [0, 1, 2])
    assert [r["dominant"] for r in rows] == ["centroid_y", "orientation", "lung_area"]
    assert rows[0]["label"].startswith("vertical position +3") and "(R2 1.00)" in rows[0]["label"]  # 1.5 px x 2 mm
    assert rows[1]["slope"]["orientation"] == pytest.approx(5.0, abs=0.5) and rows[2]["slope"]["lung_area"] > 0
    assert all(0 <= r["disentanglement"] <= 1 and r["image_change"] > 0 for r in rows)


def test_gifs_have_the_frames_and_sizes_asked_for(tmp_path):
    eps = sweep_shifts(6.0, 33)
    assert len(eps) == 33 and float(eps[0]) == -6 and float(eps[16]) == 6 and (eps == 0).sum() == 2
    # this draw made Pillow's palette optimisation write a frame it could not read back
    images = torch.rand(33, 1, 32, 32, generator=torch.Generator().manual_seed(196)) * 2 - 1
    direction_gif(images, eps, 6.0, tmp_path / "d.gif", frame_ms=50)
    frames = iio.imread(tmp_path / "d.gif", index=None)
    assert frames.shape[:3] == (33, 35, 32) and iio.immeta(tmp_path / "d.gif")["duration"] == 50
    centre = [i for i, e in enumerate(eps) if e == 0][0]
    assert frames[centre, -1].min() == 255 and frames[0, -1].min() == 0  # the centre frame's strip is lit
    grid_gif(torch.rand(3, 33, 2, 1, 32, 32) * 2 - 1, eps, 6.0, tmp_path / "g.gif")
    assert iio.imread(tmp_path / "g.gif", index=None).shape[0] == 33


def test_the_null_uses_the_methods_latents_shifts_and_direction_count(directions_runs, tiny_oracle,
                                                                     tiny_validation, tmp_path, monkeypatch):
    """Every pooled-null direction is swept from the very latents and shifts the methods are, and each method's
    null sets hold its own number of directions."""
    swept, drawn = [], []
    real_sweep, real_sets = EvalDirections.sweep, EvalDirections.null_sets

    def recording_sweep(G, dirs, ks, eps, z, *args, **kwargs):
        swept.append((dirs.method, len(ks), eps.clone(), z.clone()))
        return real_sweep(G, dirs, ks, eps, z, *args, **kwargs)

    def recording_sets(r2, effect, floor, count, sets, seed=0):
        drawn.append((len(r2), count, sets))
        return real_sets(r2, effect, floor, count, sets, seed)

    monkeypatch.setattr(EvalDirections, "sweep", recording_sweep)
    monkeypatch.setattr(EvalDirections, "null_sets", recording_sets)
    cfg = parse_settings(EvalDirections.Settings, [
        "--directions", str(directions_runs["learned"]), "--compare", str(directions_runs["sefa"]), "--oracle",
        str(tiny_oracle[1]), "--validation", str(tiny_validation), "--output", str(tmp_path / "g"), "--null-pool", "40",
        "--null-sets", "30", "--ground-truth", "auto", "--real-slices", "0", "--null-cache",
        str(tmp_path / "pool.pt"), *SMALL[:6]])
    gt = EvalDirections.main(cfg)["ground_truth"]
    methods = [s for s in swept if s[0] != "random"]
    pool = [s for s in swept if s[0] == "random"]
    reference = next(s for s in methods if s[2].numel() == cfg.report_shifts)
    assert sum(s[1] for s in pool) == 40 and all(torch.equal(s[3], reference[3]) and torch.equal(s[2], reference[2])
                                                 for s in pool)
    assert drawn == [(40, 8, 30), (40, 8, 30)]  # learned and SeFa: K = 8 each, from the one pool
    assert {k: gt["null"][k] for k in ("pool", "sets", "samples", "shifts")} == {"pool": 40, "sets": 30, "samples": 4,
                                                                               "shifts": 5}
    for table in gt["methods"].values():
        assert set(table["p_value"]) == {"0.5", "0.67", "0.8", "auc"} and table["supervision"] == "none"
        assert all(1 / 31 <= table["p_value"][k] <= 1 for k in ("0.5", "0.67", "0.8"))
    assert gt["null"]["weak"] is True  # a pool of 40 and 30 sets: said so, not hidden
    swept.clear()  # a second evaluation with the same generator, oracle and latents reuses the scored pool
    again = EvalDirections.main(cfg)["ground_truth"]
    assert not [s for s in swept if s[0] == "random"] and again["methods"]["sefa"]["p_value"] == \
        gt["methods"]["sefa"]["p_value"]


def test_embedding_reconstructs_generated_slices(gan_run, capsys):
    G = load_generator(gan_run / "generator.pt")
    target = G(torch.randn(2, G.latent_dim, generator=torch.Generator().manual_seed(5))).detach()
    _, before = embed(G, target, steps=0, restarts=1)
    z, after = embed(G, target, steps=60, restarts=2, desc="embedding test slices")
    assert z.shape == (2, G.latent_dim) and bool((after < before).all()) and float(after.max()) < 0.05
    assert "embedding test slices" in capsys.readouterr().err  # minutes on real data: a bar shows them


def test_missing_or_mismatched_generator_is_a_clear_error(directions_runs, gan_run, tmp_path):
    cfg = parse_settings(EvalDirections.Settings, ["--directions", str(directions_runs["learned"]),
                                                   "--output", str(tmp_path / "a"), "--generator",
                                                   str(tmp_path / "gone.pt"), *SMALL])
    with pytest.raises(UserError, match="is missing"):
        EvalDirections.main(cfg)
    other = tmp_path / "other.pt"
    state = torch.load(gan_run / "generator.pt", weights_only=True)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other)
    cfg.generator = str(other)
    with pytest.raises(UserError, match="directions were found for generator"):
        EvalDirections.main(cfg)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
    pytest.skip("chromium is not installed here (CI installs it)")


def test_evaluation_end_to_end_and_the_gallery_in_a_real_browser(directions_runs, tiny_oracle, tiny_validation,
                                                                  tmp_path):
    out = tmp_path / "Animations" / "tiny"
    cfg = parse_settings(EvalDirections.Settings, ["--directions", str(directions_runs["learned"]),
                                                   "--compare", str(directions_runs["sefa"]),
                                                   "--oracle", str(tiny_oracle[1]), "--validation",
                                                   str(tiny_validation), "--output", str(out), *SMALL])
    report = EvalDirections.main(cfg)
    assert len(report["directions"]) == 8 and all(r["label"] for r in report["directions"])
    assert sorted(p.name for p in out.glob("direction_*.gif")) == [f"direction_{k:03d}.gif" for k in range(8)]
    assert (out / "directions0-4.gif").is_file() and (out / "directions5-7.gif").is_file()
    assert (out / "chart0-4.png").is_file() and (out / "ground_truth" / "effect_matrix.png").is_file()
    gt = report["ground_truth"]
    assert set(gt["methods"]) == {"learned", "sefa"} and set(gt["oracle_r2"]) == set(FACTORS)
    assert gt["null"]["sets"] == 3 and gt["recoverable"] is None and gt["main"]["auc"] is None  # no supervised row
    assert {"disentanglement", "completeness"} <= set(gt["main"]["effect_dci"]) and len(gt["main"]["curve"]) == 51
    assert (out / gt["curve"]).is_file() and len(gt["oracles"]["score"]) == 64 and gt["oracles"]["fit"] is None
    assert gt["main"]["recovered"] == gt["main"]["recovered_at"]["0.67"] == len(gt["main"]["matches"]["0.67"])
    assert gt["main"]["recovered_at"]["0.5"] >= gt["main"]["recovered_at"]["0.67"] >= gt["main"]["recovered_at"]["0.8"]
    assert len(gt["main"]["r2_matrix"]) == 8 and gt["noise_floor"] == json.loads(tiny_validation.read_text())["noise_floor"]
    assert report["real"] and report["real"][0]["mse"] >= 0 and report["real"][0]["embedding"] == "optimised z"

    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    url = (out / "index.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    images = len(re.findall(r"<img ", dom))
    assert re.search(r'data-images-broken="0"', dom), dom[:500]
    assert re.search(rf'data-images-ok="{images}"', dom) and images >= 8 + 2 + 2 + 2
    assert len(re.findall(r"<tr class=\"direction\"", dom)) == 8
    shot = tmp_path / "gallery.png"
    subprocess.run([browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_pictures_are_drawn_in_the_display_window():
    from latentct.data.slices import hu_to_unit
    from latentct.show.images import display

    hu = torch.tensor([-1000.0, -850.0, -100.0, 40.0, 400.0]).view(1, 1, 1, 5)
    shown = display(hu_to_unit(hu, "default"), "default", "pulmonary")  # model window in, reading window out
    expected = ((hu.clamp(-1350, 150) + 1350) / 1500 * 2 - 1)
    assert torch.allclose(shown, expected, atol=1e-5)
    assert torch.allclose(display(shown, "pulmonary", "pulmonary"), shown)
    with pytest.raises(UserError, match="--display-window"):
        parse_settings(EvalDirections.Settings, ["--display-window", "bright"])


def test_evaluation_sweeps_the_directions_own_shift_scale(directions_runs, tmp_path):
    state = torch.load(directions_runs["sefa"], weights_only=True)
    state["settings"]["shift_scale"] = 3.0
    scaled = tmp_path / "scaled" / "directions.pt"
    scaled.parent.mkdir()
    torch.save(state, scaled)
    out = tmp_path / "gallery"
    args = ["--directions", str(scaled), "--output", str(out), "--ground-truth", "off", "--real-slices", "0", *SMALL]
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, args))
    assert report["shift_scale"] == 3.0 and report["ground_truth"] is None
    assert json.loads((out / "report.json").read_text())["shift_scale"] == 3.0
    report = EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--shift-scale", "5"]))
    assert report["shift_scale"] == 5.0  # an explicit flag wins
    with pytest.raises(UserError, match="run EvalDirections.py without it first"):
        EvalDirections.main(parse_settings(EvalDirections.Settings, ["--directions", str(scaled), "--output",
                                                                     str(tmp_path / "none"), "--ground-truth", "only"]))


def test_ground_truth_auto_goes_on_without_an_oracle(directions_runs, tmp_path, capsys):
    """On phantom data with no cached oracle, --ground-truth auto still writes the GIFs, the report and the
    gallery, and says in one line how to get the ground truth; --ground-truth only stops with that line."""
    out = tmp_path / "gallery"
    cfg = parse_settings(EvalDirections.Settings, ["--directions", str(directions_runs["learned"]), "--output",
                                                   str(out), "--root", str(tmp_path / "empty"),
                                                   "--channels-last", "off", *SMALL])
    report = EvalDirections.main(cfg)
    assert report["ground_truth"] is None and (out / "index.html").is_file() and len(list(out.glob("direction_*.gif"))) == 8
    reason = json.loads((out / "ground_truth" / "ground_truth.json").read_text())["reason"]
    assert "python -m latentct.score.oracle --image-size 32" in reason
    assert f"note: no ground truth: {reason}" in capsys.readouterr().out
    cfg.ground_truth = "only"
    with pytest.raises(UserError, match="--oracle: .* does not exist; train the factor oracle"):
        EvalDirections.main(cfg)


def test_channels_last_takes_the_trainers_convention():
    assert parse_settings(EvalDirections.Settings, []).channels_last == "auto"
    with pytest.raises(UserError, match="--channels-last.*invalid choice: 'yes'"):
        parse_settings(EvalDirections.Settings, ["--channels-last", "yes"])


def test_noise_floors_measured_for_another_run_are_refused(directions_runs, tiny_oracle, tiny_validation, tmp_path):
    """Floors measured at 4 samples and 5 shifts do not hold for 3 samples (effects shrink with the count), nor
    for another oracle; the pool must be able to make random sets of every method's size."""
    args = ["--directions", str(directions_runs["learned"]), "--oracle", str(tiny_oracle[1]), "--validation",
            str(tiny_validation), "--output", str(tmp_path / "g"), "--real-slices", "0", "--frames", "3"]
    with pytest.raises(UserError, match="--validation: .* samples 4; this run has samples 3"):
        EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--report-samples", "3",
                                                                     "--report-shifts", "5"]))
    with pytest.raises(UserError, match="--null-pool: 10 random directions cannot make random sets of 8"):
        EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--report-samples", "4",
                                                                     "--report-shifts", "5", "--null-pool", "10"]))


def test_seed_runs_of_another_scoring_design_are_refused(directions_runs, tiny_oracle, tiny_validation, tmp_path):
    """Medians over seeds or draws only mean something when every draw was scored alike: the same sample count,
    shifts and pairing of latents (a DCGAN's N(0, I) latents come in antithetic pairs)."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"design": {"samples": 4, "shifts": 5, "pairing": "independent"}, "methods": {}}))
    args = ["--directions", str(directions_runs["learned"]), "--oracle", str(tiny_oracle[1]), "--validation",
            str(tiny_validation), "--output", str(tmp_path / "g"), "--real-slices", "0", "--frames", "3",
            "--report-samples", "4", "--report-shifts", "5", "--null-pool", "16", "--null-sets", "3"]
    with pytest.raises(UserError, match="--seed-runs: .*'pairing': 'independent'.*'pairing': 'antithetic'"):
        EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--seed-runs", str(other)]))
    assert not (tmp_path / "g" / "ground_truth" / "ground_truth.json").exists()  # nothing half-merged written


def test_seed_runs_scored_by_another_oracle_floors_or_null_are_refused(directions_runs, tiny_oracle, tiny_validation,
                                                                        tmp_path):
    """A draw scored with the same design but another score oracle, other noise floors or another null is not
    merged into the medians either, and is refused before any direction is scored; one that matches all of them
    is merged."""
    args = ["--directions", str(directions_runs["learned"]), "--oracle", str(tiny_oracle[1]), "--validation",
            str(tiny_validation), "--real-slices", "0", "--frames", "3", "--report-samples", "4",
            "--report-shifts", "5", "--null-pool", "16", "--null-sets", "3"]
    EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--output", str(tmp_path / "a")]))
    kept = json.loads((tmp_path / "a" / "ground_truth" / "ground_truth.json").read_text())
    for change, name in ((lambda k: k["oracles"].update(score="0" * 64), "score oracle"),
                         (lambda k: k["noise_floor"].update(z_position=9.0), "noise floors"),
                         (lambda k: k["null"].update(sets=1000), "null pool and sets")):
        other = json.loads(json.dumps(kept))
        change(other)
        path = tmp_path / f"{name.split()[0]}.json"
        path.write_text(json.dumps(other))
        with pytest.raises(UserError, match=f"--seed-runs: .*another {name} than this run"):
            EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--output", str(tmp_path / "b"),
                                                                         "--seed", "1", "--seed-runs", str(path)]))
        assert not (tmp_path / "b" / "ground_truth").exists()  # refused before the ground truth's first file
    same = tmp_path / "same.json"
    same.write_text(json.dumps(kept))
    EvalDirections.main(parse_settings(EvalDirections.Settings, [*args, "--output", str(tmp_path / "c"), "--seed",
                                                                 "1", "--seed-runs", str(same)]))
    merged = json.loads((tmp_path / "c" / "ground_truth" / "ground_truth.json").read_text())
    assert [s["seed"] for s in merged["methods"]["learned"]["per_seed"]] == [1, 0]
