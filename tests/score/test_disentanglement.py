"""MIG and DCI by Khrulkov et al.'s protocol (latentct/score/disentanglement.py) on cases whose answer is known."""
import numpy as np
import torch

from latentct.score.disentanglement import coordinates, dci, discretize_codes, discretize_factors, mig


def _factors(n=600, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.uniform(0, 1, (n, 6))
    f[: n // 2, 5] = 0.0  # half the slices show no breast
    return f


def test_factor_bins_equal_frequency_with_no_breast_apart():
    f = _factors()
    d = discretize_factors(f, bins=5)
    assert sorted(np.bincount(d[:, 0]).tolist()) == [120] * 5  # equal-frequency bins
    assert (d[: 300, 5] == 0).all() and (d[300:, 5] >= 1).all()  # "no breast" is its own bin
    assert np.bincount(d[300:, 5]).tolist()[1:] == [75] * 4


def test_mig_is_high_for_a_one_to_one_code_and_low_for_noise():
    f = _factors()
    fd = discretize_factors(f, bins=5)
    perfect = mig(discretize_codes(f + 1e-3 * np.random.default_rng(1).normal(size=f.shape), bins=5), fd)
    noise = mig(discretize_codes(np.random.default_rng(2).normal(size=(600, 6)), bins=5), fd)
    assert perfect["mig"] > 0.8 and noise["mig"] < 0.1
    # two codes that carry the same factor leave no gap for it
    dup = f.copy()
    dup[:, 1] = f[:, 0]
    assert mig(discretize_codes(dup, bins=5), fd)["per_factor"]["z_position"] < 0.1


def test_dci_of_a_one_to_one_code_and_of_a_mixed_code():
    f = _factors()
    fd = discretize_factors(f, bins=4)
    clean = dci(f.copy(), fd, 0.75, seed=0)
    assert clean["disentanglement"] > 0.9 and clean["completeness"] > 0.9 and clean["informativeness"] > 0.8
    mixed = dci(f @ np.random.default_rng(3).normal(size=(6, 6)), fd, 0.75, seed=0)
    assert mixed["disentanglement"] < clean["disentanglement"] - 0.3


def test_coordinates_along_directions():
    matrix = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0][:3]
    c = torch.tensor([[1.0, -2.0, 0.5]])
    z = c @ matrix + 0.0
    assert torch.allclose(coordinates(z, matrix), c, atol=1e-5)


def test_code_encoder_reads_coordinates_it_can_see_and_not_those_it_cannot():
    """The encoder's held-out R2, reported beside MIG/DCI: high when the images carry z, about 0 when not."""
    from latentct.score.disentanglement import train_encoder

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1024, 8, generator=gen)
    images = torch.tanh(z @ torch.randn(8, 32 * 32, generator=gen) / 3).reshape(-1, 1, 32, 32)
    matrix = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0][:3]
    _, seen = train_encoder((z, images), matrix, steps=300, batch=64, seed=0)
    _, blind = train_encoder((z, torch.rand(1024, 1, 32, 32, generator=gen)), matrix, steps=300, batch=64, seed=0)
    assert seen > 0.8 and blind < 0.1, (seen, blind)
