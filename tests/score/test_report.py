"""What each direction does on real CT, where there is no oracle (latentct/score/report.py): labels name a
mixture as a mixture."""
import numpy as np
import pytest
import torch

from latentct.data import phantom
from latentct.data.slices import hu_to_unit
from latentct.score.report import describe, label, measurement_shares


def row(shares: dict, r2: float = 0.9, slope: float = 2.0) -> dict:
    return {"shares": shares, "r2": {m: r2 for m in shares}, "slope": {m: slope for m in shares}}


def test_a_mixture_is_labelled_as_a_mixture():
    mixed = row({"lung_area": 0.55, "centroid_y": 0.25, "anterior_tissue": 0.20, "width": 0.0})
    assert label(mixed) == ("mixture: lung area 0.55, vertical position 0.25, anterior soft tissue (breast) 0.20")


def test_one_name_only_for_more_than_two_thirds_on_a_line():
    clean = row({"thickness": 0.8, "width": 0.2})
    assert label(clean) == "AP thickness +2 mm per unit (R2 0.90)"
    assert label(row({"thickness": 0.8, "width": 0.2}, r2=0.3)).startswith("mixture: AP thickness 0.80")
    assert label(row({"thickness": 2 / 3, "width": 1 / 3})).startswith("mixture:")  # exactly 2/3 is no majority
    assert measurement_shares({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}


def test_changes_are_normalised_by_the_real_slices_spread():
    """The same sweep, with one measurement's real spread doubled: its effect halves."""
    patient = phantom.sample_patient(np.random.default_rng(1))
    frames = []
    for shift in (-2, -1, 0, 1, 2):
        hu = phantom.render_slice(patient, 0.5, 64, np.random.default_rng(2))
        frames.append(torch.roll(torch.from_numpy(hu.astype("float32")), shifts=shift, dims=0))
    images = hu_to_unit(torch.stack(frames)[None, :, None, None], "default")   # (1, 5, 1, 1, 64, 64)
    eps = torch.linspace(-1, 1, 5)
    spreads = {"centroid_y": 4.0, "width": 10.0}
    base = describe(images, eps, (-1000.0, 2000.0), 1.0, [0], spreads)[0]
    wider = describe(images, eps, (-1000.0, 2000.0), 1.0, [0], dict(spreads, centroid_y=8.0))[0]
    assert base["effect"]["centroid_y"] == pytest.approx(2 * wider["effect"]["centroid_y"], rel=1e-6)
    assert base["dominant"] == "centroid_y" and base["label"].startswith("vertical position")
