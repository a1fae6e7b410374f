"""Shared tiny inputs: one phantom tree and its preprocessed dataset, built once per test session."""
from pathlib import Path

import pytest
import torch

import preprocess
from latentct.data import phantom

torch.set_num_threads(2)

PHANTOM = dict(patients=5, slices=10, size=64, seed=3, repeat_scans=1, radiograph_fraction=0.5)


@pytest.fixture(scope="session")
def phantom_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "tree"
    return phantom.write_phantom(phantom.Settings(output=str(out), **PHANTOM))


@pytest.fixture(scope="session")
def dataset(phantom_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds32"
    return preprocess.main(preprocess.Settings(input=str(phantom_tree), output=str(out), size=32,
                                               test_fraction=0.4, workers=1))


@pytest.fixture(scope="session")
def gan_run(dataset, tmp_path_factory) -> Path:
    """A tiny DCGAN trained with the demo preset at 32 px: enough structure for direction tests."""
    from latentct.util.settings import parse_settings
    from Training import TrainGAN

    out = tmp_path_factory.mktemp("gan") / "demo"
    cfg = parse_settings(TrainGAN.Settings, [
        "--preset", "demo", "--data", str(dataset), "--output", str(out), "--steps", "150", "--batch-size", "32",
        "--eval-every", "150", "--eval-samples", "32", "--workers", "0", "--device", "cpu"], presets=TrainGAN.PRESETS)
    TrainGAN.main(cfg)
    return out


@pytest.fixture(scope="session")
def directions_runs(gan_run, tmp_path_factory) -> dict:
    """A short learned run and a SeFa run (K = 8) on the tiny GAN."""
    from latentct.util.settings import parse_settings
    from Training import TrainDirections

    root = tmp_path_factory.mktemp("directions")
    runs = {}
    for method in ("learned", "sefa"):
        cfg = parse_settings(TrainDirections.Settings, [
            "--generator", str(gan_run / "generator.pt"), "--output", str(root / method), "--method", method,
            "--directions-count", "8", "--steps", "20", "--batch-size", "16", "--eval-every", "20",
            "--rca-batches", "2", "--sample-every", "1000", "--device", "cpu"])
        TrainDirections.main(cfg)
        runs[method] = root / method / "directions.pt"
    return runs


@pytest.fixture(scope="session")
def tiny_oracle(tmp_path_factory):
    """A factor oracle for 32 px slices, trained briefly: (settings, oracle.pt path, held-out R2)."""
    from latentct.score import oracle

    root = tmp_path_factory.mktemp("oracle_root")
    cfg = oracle.Settings(image_size=32, root=str(root), render_size=64, train_slices=400, test_slices=200,
                          steps=150, batch_size=64, width=8)
    r2 = oracle.main(cfg)
    return cfg, oracle.folder_for(cfg) / "oracle.pt", r2


@pytest.fixture(scope="session")
def tiny_validation(tiny_oracle, tmp_path_factory):
    """Known-answer sweeps read by the tiny oracle: the noise floors the ground truth needs (validation.json)."""
    from latentct.score import validate

    out = tmp_path_factory.mktemp("validation")
    validate.main(validate.Settings(output=str(out), image_size=32, oracle=str(tiny_oracle[1]), patients=4,
                                    pair_patients=4, frames=5, render_size=64, scored_samples=4))
    return out / "validation.json"
