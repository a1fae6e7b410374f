"""Shared tiny inputs: one phantom tree and its preprocessed dataset, built once per test session."""
from pathlib import Path

import pytest
import torch

import preprocess
from latentct import phantom

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
