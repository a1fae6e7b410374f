"""A diffusion model as a generator (latentct/generators/diffusion.py, Training/TrainDiffusion.py): a tiny latent
diffusion model at 32 px, a few steps of each network."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentct.discover.baselines import baseline_matrix, fit_directions, h_pca, spectral
from latentct.generators.diffusion import h_principal_components
from latentct.generators.interface import direction_block, load_generator, report_latents, sample_latents
from latentct.util.settings import UserError, parse_settings
from Training import TrainDiffusion, TrainDirections

ROOT = Path(__file__).resolve().parents[2]


def train(dataset, out, *extra):
    cfg = parse_settings(TrainDiffusion.Settings, ["--preset", "tiny", "--data", str(dataset), "--output", str(out),
                                                   "--device", "cpu", *extra], presets=TrainDiffusion.PRESETS)
    return TrainDiffusion.main(cfg)


@pytest.fixture(scope="module")
def diffusion_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion") / "tiny"
    train(dataset, out)
    return out / "generator.pt"


@pytest.mark.parametrize("view", ["noise", "h"])
def test_same_noise_same_image_alone_or_in_a_batch(diffusion_run, view):
    G = load_generator(diffusion_run, diffusion={"view": view, "ddim_steps": 3})
    z = sample_latents(G, 5, torch.Generator().manual_seed(0))
    if view == "h":  # an edit inside the window, the same in every call
        z[:, G.x_dim:] = torch.randn(5, G.h_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch, again = G(z), G(z)
        alone = torch.cat([G(z[i:i + 1]) for i in range(len(z))])
    assert batch.shape == (5, 1, 32, 32) and batch.abs().max() <= 1
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone, batch, atol=1e-4, rtol=0)
    assert G.reference["options"]["diffusion"] == {"view": view, "ddim_steps": 3, "t_edit": 500}


def test_h_view_draws_no_offset_and_directions_move_dh_only(diffusion_run):
    G = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3})
    z = sample_latents(G, 4, torch.Generator().manual_seed(0))
    assert z.shape == (4, G.x_dim + G.h_dim) and torch.equal(z[:, G.x_dim:], torch.zeros(4, G.h_dim))
    scored = report_latents(G, 4, torch.Generator().manual_seed(0))  # antithetic noise, still no offset
    assert torch.equal(scored[2:, :G.x_dim], -scored[:2, :G.x_dim]) and not scored[:, G.x_dim:].any()
    assert direction_block(G) == (G.x_dim, G.x_dim + G.h_dim) and G.h_rms > 0
    for matrix in (baseline_matrix("random", G, 4), h_pca(G, 4), spectral(G, 3, samples=2, iterations=1)[0]):
        assert matrix[:, :G.x_dim].abs().max() == 0
        torch.testing.assert_close(matrix.norm(dim=1), torch.ones(len(matrix)))
    noise = load_generator(diffusion_run, diffusion={"ddim_steps": 3})
    with pytest.raises(UserError, match="h view"):
        h_pca(noise, 2)


def test_an_empty_edit_window_changes_nothing_and_an_edit_inside_it_does(diffusion_run):
    x_T = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    plain = load_generator(diffusion_run, diffusion={"ddim_steps": 3})
    with torch.no_grad():
        reference = plain(x_T)
    dh = 20 * torch.randn(3, plain.h_dim, generator=torch.Generator().manual_seed(3))
    outside = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3, "t_edit": 1000})
    inside = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3, "t_edit": 0})
    assert outside.steps_in_window() == 0 and inside.steps_in_window() == 3
    with torch.no_grad():
        assert torch.equal(outside(torch.cat([x_T, dh], 1)), reference)
        assert torch.equal(inside(torch.cat([x_T, torch.zeros_like(dh)], 1)), reference)
        assert (inside(torch.cat([x_T, dh], 1)) - reference).abs().max() > 1e-3


def test_pca_of_h_recovers_a_planted_direction(diffusion_run):
    G = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3, "t_edit": 0})
    planted = torch.nn.functional.normalize(torch.randn(G.h_dim, generator=torch.Generator().manual_seed(4)), dim=0)
    # h plus a term along one direction whose size is drawn for every sample and step, 20x h's typical magnitude
    sizes = torch.Generator().manual_seed(6)
    hook = G.unet.middle_block.register_forward_hook(
        lambda m, inputs, out: out + 20 * G.h_rms * G.h_dim ** 0.5 * torch.randn(len(out), 1, 1, 1, generator=sizes)
        * planted.view(1, *G.h_shape))
    try:
        components, spread = h_principal_components(G, 3, samples=32)
    finally:
        hook.remove()
    assert abs(float(components[0].double() @ planted.double())) > 0.99
    assert spread[0] > 3 * spread[1]


def test_supervised_fit_is_ridge_where_the_latent_is_wider_than_half_the_samples():
    gen = torch.Generator().manual_seed(5)
    d, n = 300, 400
    z = torch.randn(n + n // 2, d, generator=gen, dtype=torch.float64)
    truth = torch.zeros(6, d, dtype=torch.float64)
    truth[torch.arange(6), torch.arange(6) * 7] = 1.0  # factor f moves with coordinate 7 f
    readings = z @ truth.t() + 0.05 * torch.randn(len(z), 6, generator=gen, dtype=torch.float64)
    directions, info = fit_directions(z, readings, n)
    assert info["solver"].startswith("ridge")
    assert min(info["fit_r2"].values()) > 0.9
    best = directions.double() @ truth.t()
    assert torch.all(best.diagonal() > 0.9)
    _, small = fit_directions(z[:, :20], readings, n)
    assert small["solver"] == "least squares"


def test_train_diffusion_resumes_exactly(dataset, tmp_path):
    """Stopped across the autoencoder -> UNet boundary and continued, a run ends where the uninterrupted one does."""
    train(dataset, tmp_path / "whole", "--log-every", "1")
    train(dataset, tmp_path / "cut", "--log-every", "1", "--steps", "2")        # 4 autoencoder + 2 UNet steps
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    train(dataset, tmp_path / "cut", "--log-every", "1")                        # continues to 4 + 4
    logs = {name: {r["step"]: r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                   if "loss" in r or "ae_loss" in r} for name in ("whole", "cut")}
    assert sorted(logs["cut"]) == list(range(1, 9))
    for step in range(1, 9):
        key = "ae_loss" if step <= 4 else "loss"
        assert logs["cut"][step][key] == pytest.approx(logs["whole"][step][key], rel=1e-6), step
    a, b = (torch.load(tmp_path / name / "generator.pt", weights_only=True) for name in ("whole", "cut"))
    assert a["args"]["scale_factor"] == b["args"]["scale_factor"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6)


def test_directions_record_the_view_and_eval_refuses_a_contradicting_flag(diffusion_run, tmp_path):
    import EvalDirections

    out = tmp_path / "hpca"
    TrainDirections.main(parse_settings(TrainDirections.Settings, [
        "--generator", str(diffusion_run), "--diffusion-view", "h", "--ddim-steps", "3", "--method", "hpca",
        "--directions-count", "3", "--no-rca", "--output", str(out), "--device", "cpu"]))
    state = torch.load(out / "directions.pt", weights_only=True)
    assert state["diffusion"] == {"view": "h", "ddim_steps": 3, "t_edit": 500}
    TrainDirections.main(parse_settings(TrainDirections.Settings, [
        "--generator", str(diffusion_run), "--ddim-steps", "3", "--method", "random", "--directions-count", "3",
        "--no-rca", "--output", str(tmp_path / "noise"), "--device", "cpu"]))
    with pytest.raises(UserError, match="compare files of one view"):
        EvalDirections.main(EvalDirections.Settings(directions=str(out / "directions.pt"), output=str(tmp_path / "b"),
                                                    compare=[str(tmp_path / "noise" / "directions.pt")],
                                                    report_samples=2, frames=3, real_slices=0))
    with pytest.raises(UserError, match="--ddim-steps: 5 contradicts"):
        EvalDirections.main(EvalDirections.Settings(directions=str(out / "directions.pt"), output=str(tmp_path / "a"),
                                                    ddim_steps=5))
    with pytest.raises(UserError, match="learned"):
        TrainDirections.main(parse_settings(TrainDirections.Settings, [
            "--generator", str(diffusion_run), "--diffusion-view", "h", "--output", str(tmp_path / "l"),
            "--steps", "1", "--device", "cpu"]))
    learned = tmp_path / "learned_noise"  # the study's method trains through the sampler in the noise view
    TrainDirections.main(parse_settings(TrainDirections.Settings, [
        "--generator", str(diffusion_run), "--ddim-steps", "3", "--directions-count", "4", "--steps", "2",
        "--batch-size", "4", "--rca-batches", "1", "--eval-every", "2", "--sample-every", "2", "--reconstructor",
        "resnet", "--output", str(learned), "--device", "cpu"]))
    state = torch.load(learned / "directions.pt", weights_only=True)
    assert state["matrix"].shape == (4, 512) and state["rca"] is not None and state["diffusion"]["view"] == "noise"
    dcgan_flag = parse_settings(TrainDirections.Settings, ["--generator", str(diffusion_run), "--t-edit", "300"])
    assert dcgan_flag.generator_options()["diffusion"] == {"t_edit": 300}


FACTORY = '''
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

def make(broken=""):
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, num_res_blocks=1, channels=(8, 16),
                              attention_levels=(False, True), norm_num_groups=4, num_head_channels=8)
    ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                       attention_levels=(False, False), latent_channels=2, norm_num_groups=4,
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    made = {"unet": unet, "autoencoder": ae, "scale_factor": 1.5, "sample_shape": [2, 16, 16],
            "schedule": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                         "beta_end": 0.0195}, "output_window": [-1000, 2000]}
    if broken == "shape":
        del made["sample_shape"]
    if broken == "unet":
        made["unet"] = ae
    return made
'''


def test_a_monai_diffusion_plugin_loads_and_a_bad_one_gets_one_line(diffusion_run, tmp_path):
    factory = tmp_path / "mine.py"
    factory.write_text(FACTORY)
    state = torch.load(diffusion_run, weights_only=True)
    weights = tmp_path / "weights.pt"
    torch.save({key: {k[len(key) + 1:]: v for k, v in state["state_dict"].items() if k.startswith(key + ".")}
                for key in ("unet", "autoencoder")}, weights)
    G = load_generator(f"{factory}:make", weights=str(weights), diffusion={"view": "h", "ddim_steps": 3})
    native = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3})
    assert G.window == (-1000.0, 2000.0) and G.reference["kind"] == "factory"
    assert G.latent_dim == native.latent_dim and str(weights.resolve()) in G.reference["files"]
    z = sample_latents(native, 2, torch.Generator().manual_seed(0))
    native.scale_factor = 1.5
    with torch.no_grad():
        torch.testing.assert_close(G(z), native(z))
    for broken, message in (("shape", "sample_shape"), ("unet", "middle_block")):
        with pytest.raises(UserError, match=message) as err:
            load_generator(f"{factory}:make", args={"broken": broken})
        assert "\n" not in str(err.value)
    torch.save({"unet": {}}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="state dict per module"):
        load_generator(f"{factory}:make", weights=str(tmp_path / "bad.pt"))
    cli = subprocess.run([sys.executable, str(ROOT / "Training" / "TrainDirections.py"), "--generator",
                          f"{factory}:make", "--generator-args", '{"broken": "shape"}', "--method", "random",
                          "--output", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode != 0 and len(cli.stderr.strip().splitlines()) == 1 and "sample_shape" in cli.stderr


def test_a_fit_in_standardised_coordinates_ignores_the_noisy_slopes_of_columns_that_barely_vary():
    """h's trailing principal components barely vary: their fitted slopes are noise divided by a tiny spread, and
    a least-norm direction on raw coordinates runs along them. Standardised, it follows the column that moves."""
    gen = torch.Generator().manual_seed(7)
    n, k = 600, 10
    spread = torch.tensor([1.0] * 6 + [1e-3] * 4, dtype=torch.float64)
    coords = torch.randn(n + n // 2, k, generator=gen, dtype=torch.float64) * spread
    readings = coords[:, :6] + 0.05 * torch.randn(len(coords), 6, generator=gen, dtype=torch.float64)
    basis = torch.eye(k, dtype=torch.float64)
    raw, raw_info = fit_directions(coords, readings, n, basis=basis)
    scaled, info = fit_directions(coords, readings, n, basis=basis, scales=spread)
    assert torch.all(scaled[:, :6].double().diagonal().abs() > 0.99)
    assert raw[:, :6].double().diagonal().abs().min() < 0.5  # raw: half a direction spent on the still columns
    assert info["condition_number"] < 1.1 < 4 < raw_info["condition_number"]


def test_each_ddim_step_lands_on_the_next_listed_timestep_and_inversion_mirrors_it(diffusion_run):
    G = load_generator(diffusion_run, diffusion={"ddim_steps": 3})
    assert G.step_pairs() == [(999, 500), (500, 0), (0, None)]  # MONAI's step would move 999 -> 666 here
    G.decode, G.autoencoder = (lambda x: x), None  # the UNet's own latent, to invert it exactly
    x_T = torch.randn(4, G.x_dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        back = G.invert(G(x_T))
    assert float((back - x_T).norm() / x_T.norm()) < 0.01


def test_h_view_refuses_methods_that_read_prior_draws_and_pca_keeps_only_spanned_components(diffusion_run, tmp_path):
    for method in ("ica", "spca"):
        with pytest.raises(UserError, match=f"--method {method}: in a diffusion h view"):
            TrainDirections.main(parse_settings(TrainDirections.Settings, [
                "--generator", str(diffusion_run), "--diffusion-view", "h", "--ddim-steps", "3", "--method", method,
                "--no-rca", "--output", str(tmp_path / method), "--device", "cpu"]))
    G = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3, "t_edit": 999})  # one step edited
    components, spread = h_principal_components(G, 20, samples=8)
    assert len(components) <= 7 and spread.min() > 1e-6 * spread.max()  # 8 rows span at most 7 directions
    basis = torch.linalg.qr(torch.randn(G.h_dim, 3, generator=torch.Generator().manual_seed(9),
                                        dtype=torch.float64))[0]
    full = torch.zeros(G.latent_dim, 3, dtype=torch.float64)
    full[G.x_dim:] = basis
    z = G.fit_in_span(4000, full, torch.Generator().manual_seed(10))
    coords = z[:, G.x_dim:].double() @ basis
    torch.testing.assert_close(torch.cov(coords.t()), 9 * torch.eye(3, dtype=torch.float64), atol=0.6, rtol=0)
    assert torch.allclose(z[:, G.x_dim:].double(), coords @ basis.t(), atol=1e-4)  # nothing outside the span


def test_the_ridge_reports_each_direction_own_slope_not_the_shrunk_one():
    gen = torch.Generator().manual_seed(11)
    d, n = 400, 800  # exactly half: ridge
    z = torch.randn(n + n // 2, d, generator=gen, dtype=torch.float64)
    truth = torch.zeros(6, d, dtype=torch.float64)
    truth[torch.arange(6), torch.arange(6)] = 0.5
    readings = z @ truth.t() + 0.05 * torch.randn(len(z), 6, generator=gen, dtype=torch.float64)
    directions, info = fit_directions(z, readings, n)
    assert info["solver"].startswith("ridge")
    actual = (directions.double() @ truth.t()).diagonal()  # the true change of each factor per unit shift
    for f, value in zip(info["per_unit_shift"].values(), actual):
        assert f == pytest.approx(float(value), rel=0.1)


def test_h_view_fit_readings_are_differences_from_the_same_noise_without_the_edit(diffusion_run):
    """What x_T draws drops out of the h view's fit: a reader of image brightness sees only what dh changed."""
    from latentct.discover.baselines import readings_of

    G = load_generator(diffusion_run, diffusion={"view": "h", "ddim_steps": 3, "t_edit": 0})

    class Brightness:
        window = G.window

        @staticmethod
        def read(images):
            return images.flatten(1).mean(1, keepdim=True).repeat(1, 6)

    z = sample_latents(G, 3, torch.Generator().manual_seed(12))
    assert readings_of(G, Brightness, G.window, z, paired=True).abs().max() == 0  # dh = 0: nothing changed
    z[:, G.x_dim:] = 30 * torch.randn(3, G.h_dim, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        edited, plain = G(z), G(torch.cat([z[:, :G.x_dim], torch.zeros(3, G.h_dim)], 1))
    from latentct.show.images import display

    expected = (display(edited, G.window, G.window).flatten(1).mean(1) - display(plain, G.window, G.window)
                .flatten(1).mean(1)).double()
    torch.testing.assert_close(readings_of(G, Brightness, G.window, z, paired=True)[:, 0], expected)
    from latentct.discover.baselines import fit_readings  # the supervised fit reads the h view paired

    drawn, readings = fit_readings(G, Brightness, G.window, samples=4)
    assert drawn[:, G.x_dim:].abs().max() > 0
    torch.testing.assert_close(readings, readings_of(G, Brightness, G.window, drawn, paired=True))
