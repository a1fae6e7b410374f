import math

import numpy as np
import pytest
import torch

from latentct.data import phantom
from latentct.score import anatomy

SIZE = 128
SPACING = phantom.FOV_MM / SIZE


def measured(**changes):
    p = phantom.patient_for(0, 2)
    p.__dict__.update(dict(rotation=0.0, y_offset=0.0, breast_size=0.0))
    z = changes.pop("z", 0.5)
    p.__dict__.update(changes)
    img = phantom.render_slice(p, z, SIZE, np.random.default_rng(0))
    values = anatomy.measure(torch.tensor(img)[None, None], SPACING)
    return {k: float(v[0]) for k, v in values.items()}, phantom.slice_geometry(p, z), p


def test_sizes_match_the_phantom_geometry():
    m, g, p = measured()
    assert m["width"] == pytest.approx(2 * g.half_width, abs=2 * SPACING)
    assert m["thickness"] == pytest.approx(2 * g.half_thickness, abs=2 * SPACING)
    assert abs(m["centroid_x"]) < SPACING and abs(m["orientation"]) < 1.0
    assert m["lung_area"] > 50 and m["bone_area"] > 5 and -400 < m["mean_hu"] < 100
    body_cm2 = math.pi * g.half_width * g.half_thickness / 100  # an ellipse of the same axes, roughly
    assert 0.8 * body_cm2 < m["body_area"] < 1.3 * body_cm2


def test_each_factor_moves_its_measurement():
    base, g_base, _ = measured()
    assert measured(rotation=10.0)[0]["orientation"] == pytest.approx(10.0, abs=1.5)
    assert measured(rotation=-8.0)[0]["orientation"] == pytest.approx(-8.0, abs=1.5)
    assert measured(y_offset=20.0)[0]["centroid_y"] - base["centroid_y"] == pytest.approx(20.0, abs=SPACING)
    wide, g, _ = measured(width=phantom.patient_for(0, 2).width + 40)
    assert wide["width"] - base["width"] == pytest.approx(2 * (g.half_width - g_base.half_width), abs=2 * SPACING)
    assert measured(breast_size=1.0)[0]["anterior_tissue"] > 2 * base["anterior_tissue"]
    assert measured(z=0.05)[0]["lung_area"] < 0.6 * base["lung_area"]
    assert measured(z=1.0)[0]["lung_area"] < 0.25 * base["lung_area"]  # only stomach gas below the diaphragm


def test_empty_image_gives_nan_shapes_and_zero_areas():
    values = anatomy.measure(torch.full((2, 1, 32, 32), -1000.0))
    assert float(values["body_area"][0]) == 0 and math.isnan(float(values["width"][0]))
    disk = torch.full((1, 1, 32, 32), -1000.0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disk[0, 0][(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = 40.0
    solid = anatomy.measure(disk)
    assert float(solid["body_area"][0]) > 0 and math.isnan(float(solid["anterior_tissue"][0]))  # no lungs


def test_table_is_not_body():
    p = phantom.patient_for(0, 2)
    p.__dict__.update(dict(rotation=0.0, y_offset=20.0, breast_size=0.0))
    img = torch.tensor(phantom.render_slice(p, 0.5, SIZE, np.random.default_rng(0)))[None, None]
    body = anatomy.body_mask(img)[0, 0]
    rows = torch.nonzero(body.any(1)).flatten()
    bottom_mm = (float(rows.max()) + 1 - SIZE / 2) * SPACING
    g = phantom.slice_geometry(p, 0.5)
    assert bottom_mm == pytest.approx(p.y_offset + g.half_thickness, abs=2 * SPACING)


def test_anatomy_distance_leaves_out_slices_without_lungs():
    """A set compared with itself is at distance 0 even when some slices (below the diaphragm) have no anterior
    tissue measurement; the same chest slices against abdomen-heavy ones are further apart."""
    from latentct.train.metrics import anatomy_distance

    p = phantom.patient_for(0, 2)
    render = lambda z: torch.tensor(phantom.render_slice(p, z, 64, np.random.default_rng(0)))[None]
    chest = torch.stack([render(z) for z in (0.4, 0.45, 0.5, 0.55)])
    mixed = torch.stack([render(z) for z in (0.4, 0.5, 0.97, 0.99)])   # the last two: upper abdomen
    assert torch.isnan(anatomy.measure(mixed)["anterior_tissue"]).any()
    same = anatomy_distance(mixed, mixed)
    assert same["anatomy_distance"] == 0 and same["anatomy"]["anterior_tissue"] == 0
    apart = anatomy_distance(mixed, chest)
    assert math.isfinite(apart["anatomy_distance"]) and apart["anatomy_distance"] > 0.1
