import pytest
import torch
import torch.nn as nn

from latentct.generators.interface import report_latents
from latentct.score.report import fit_lines


class Gaussian(nn.Module):
    latent_dim = 4


class Encoded(nn.Module):
    latent_dim = 4

    def __init__(self):
        super().__init__()
        self.prior = torch.arange(40, dtype=torch.float32).view(10, 4)  # row r holds 4r .. 4r + 3


@pytest.mark.parametrize("n", [6, 5])
def test_report_latents_come_in_antithetic_pairs_under_a_gaussian_prior(n):
    z = report_latents(Gaussian(), n, torch.Generator().manual_seed(0))
    half = (n + 1) // 2
    assert z.shape == (n, 4)
    torch.testing.assert_close(z[half:], -z[:n - half])
    assert z[:half].abs().min() > 0  # drawn, not zero


def test_encoded_latents_are_drawn_from_the_scoring_rows_not_mirrored():
    z = report_latents(Encoded(), 12, torch.Generator().manual_seed(0))
    rows = (z[:, 0] / 4).long()
    assert torch.equal(z, Encoded().prior[rows]) and (rows % 2 == 1).all()  # the odd rows: part="score"


def test_a_slope_that_varies_linearly_over_the_latent_averages_to_its_centre_on_antithetic_pairs():
    """A direction whose effect at z is 1 + b.z (it moves the factor more on one side of the latent space): on
    antithetic latents the mean slope is exactly 1; on as many independent draws it is not."""
    b = torch.tensor([0.8, -0.5, 0.3, 0.6])
    eps = torch.linspace(-1, 1, 5)
    for z, exact in ((report_latents(Gaussian(), 8, torch.Generator().manual_seed(1)), True),
                     (torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), False)):
        values = (eps[:, None] * (1 + z @ b)[None, :])[None]  # (1 direction, E shifts, Z samples)
        slope, r2 = fit_lines(values, eps)
        assert (abs(slope[0] - 1) < 1e-6) == exact and r2[0] > 0.999
