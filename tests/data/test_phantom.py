import csv
from collections import Counter

import numpy as np
import pydicom
import pytest
from conftest import PHANTOM

from latentct.data import phantom
from latentct.util.settings import UserError


def _to_pixel(xy_mm, size, fov=phantom.FOV_MM):
    x, y = xy_mm
    return int((y + fov / 2) / (fov / size)), int((x + fov / 2) / (fov / size))


def test_tree_has_tcia_layout_and_decoys(phantom_tree):
    files = [p for p in phantom_tree.rglob("*") if p.is_file()]
    dcm = [p for p in files if p.suffix == ".dcm"]
    patients = sorted(p.name for p in phantom_tree.iterdir() if p.is_dir())
    assert patients == [f"LIDC-IDRI-{i:04d}" for i in range(1, PHANTOM["patients"] + 1)]
    ct = [p for p in dcm if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"]
    assert len(ct) == (PHANTOM["patients"] + PHANTOM["repeat_scans"]) * PHANTOM["slices"]
    assert any(pydicom.dcmread(p, stop_before_pixels=True).Modality == "DX" for p in dcm)
    assert any(p.suffix == ".xml" for p in files)
    rel = ct[0].relative_to(phantom_tree).parts  # patient / study / series / file
    assert len(rel) == 4 and rel[1].count("-") >= 4 and ".000000-NA-" in rel[2] and rel[3].startswith("1-")


def test_file_names_are_not_in_z_order_and_tags_are_ct(phantom_tree):
    series_dir = next(p.parent for p in phantom_tree.rglob("1-001.dcm"))
    items = []
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        items.append((path.name, float(ds.ImagePositionPatient[2])))
        assert ds.SOPClassUID == phantom.CT_IMAGE_STORAGE and ds.PixelRepresentation == 1
        assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1 and ds.BitsAllocated == 16
        assert list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
    z_by_name = [z for _, z in items]
    assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)


def test_factors_csv_matches_sampled_patients(phantom_tree):
    rows = list(csv.DictReader(open(phantom_tree / "phantom_factors.csv")))
    assert set(phantom.FACTORS) <= set(rows[0])
    per_patient = Counter(r["patient_id"] for r in rows)
    assert per_patient["LIDC-IDRI-0001"] == 2 * PHANTOM["slices"]  # the repeat scan
    for idx in range(PHANTOM["patients"]):
        p = phantom.patient_for(PHANTOM["seed"], idx)
        mine = [r for r in rows if r["patient_id"] == f"LIDC-IDRI-{idx + 1:04d}"]
        assert {round(float(r["rotation"]), 3) for r in mine} == {round(p.rotation, 3)}
        assert sorted(float(r["z_position"]) for r in mine)[0] == 0.0
    for name, (low, high) in phantom.FACTOR_RANGES.items():
        values = [float(r[name]) for r in rows]
        assert all(low <= v <= high or (name == "breast_size" and v == 0) for v in values)


def test_same_seed_same_pixels(tmp_path):
    kw = dict(PHANTOM, patients=1, slices=3, repeat_scans=0, radiograph_fraction=0.0)
    a = phantom.write_phantom(phantom.Settings(output=str(tmp_path / "a"), **kw))
    b = phantom.write_phantom(phantom.Settings(output=str(tmp_path / "b"), **kw))
    for fa in sorted(a.rglob("*.dcm")):
        fb = b / fa.relative_to(a)
        assert np.array_equal(pydicom.dcmread(fa).pixel_array, pydicom.dcmread(fb).pixel_array)
    with pytest.raises(UserError, match="exists"):
        phantom.write_phantom(phantom.Settings(output=str(a), **kw))


def test_anatomy_in_hounsfield_units_where_the_geometry_says():
    p = phantom.patient_for(0, 0)
    p.breast_size = 0.0
    size = 256
    rng = np.random.default_rng(0)
    chest = phantom.render_slice(p, 0.5, size, rng)
    marks = phantom.landmarks(p, 0.5)
    assert chest[_to_pixel(marks["right_lung"], size)] < -600
    assert chest[_to_pixel(marks["left_lung"], size)] < -600
    assert chest[_to_pixel(marks["spine"], size)] > 150
    assert chest[2, 2] < -950  # air
    abdomen = phantom.render_slice(p, 1.0, size, rng)
    assert abdomen[_to_pixel(marks["right_lung"], size)] > -200  # lung gone below the diaphragm
    assert 0 < abdomen[_to_pixel(phantom.landmarks(p, 1.0)["liver"], size)] < 150


def test_factors_move_the_anatomy():
    base = phantom.patient_for(0, 1)
    base.rotation, base.y_offset, base.breast_size = 0.0, 0.0, 0.0
    rng = np.random.default_rng(0)
    size, spacing = 128, phantom.FOV_MM / 128

    def body(p, z=0.5):
        return phantom.render_slice(p, z, size, rng) > -300

    def lung(p, z=0.5):  # air inside the body wall
        g = phantom.slice_geometry(p, z)
        c = (np.arange(size) + 0.5) * spacing - phantom.FOV_MM / 2
        inside = (c[None, :] / g.inner_a) ** 2 + ((c[:, None] - p.y_offset) / g.inner_b) ** 2 < 1
        return (phantom.render_slice(p, z, size, rng) < -400) & inside

    rows = lambda m: np.nonzero(m.any(1))[0]  # noqa: E731
    shifted = phantom.patient_for(0, 1)
    shifted.__dict__.update(rotation=0.0, y_offset=25.0, breast_size=0.0)
    assert rows(body(shifted))[0] - rows(body(base))[0] == pytest.approx(25 / spacing, abs=2)
    thick = phantom.patient_for(0, 1)
    thick.__dict__.update(rotation=0.0, y_offset=0.0, breast_size=0.0, thickness=base.thickness + 40)
    assert body(thick).sum() > body(base).sum() * 1.1
    breasts = phantom.patient_for(0, 1)
    breasts.__dict__.update(rotation=0.0, y_offset=0.0, breast_size=1.0)
    assert body(breasts).sum() > body(base).sum() + 200
    apex, mid = lung(base, 0.05).sum(), lung(base, 0.5).sum()
    assert mid > 2 * apex and lung(base, 1.0).sum() < apex


def test_random_extent_series_cover_a_stretch_with_z_mm_linear_in_position(tmp_path):
    """--extent random (the metadata set): each series covers its own stretch of at least a quarter of the
    apex-to-abdomen range, its slices evenly spaced, and z_mm follows the position on one line per patient; the
    full extent's slices stay those the default writes."""
    kw = dict(PHANTOM, patients=6, slices=4, size=32, repeat_scans=0, radiograph_fraction=0.0)
    out = phantom.write_phantom(phantom.Settings(output=str(tmp_path / "r"), extent="random", **kw))
    rows = list(csv.DictReader(open(out / "phantom_factors.csv")))
    stretches = []
    for pid in {r["patient_id"] for r in rows}:
        mine = sorted((float(r["z_position"]), float(r["z_mm"])) for r in rows if r["patient_id"] == pid)
        z, mm = np.array(mine).T
        assert len(z) == 4 and 0.0 <= z[0] and z[-1] <= 1.0 and z[-1] - z[0] >= phantom.MIN_EXTENT - 1e-6
        assert np.allclose(np.diff(z), np.diff(z)[0], atol=1e-5)
        slope = np.polyfit(z, mm, 1)[0]
        assert -330.0 <= slope <= -260.0 and np.allclose(np.polyval(np.polyfit(z, mm, 1), z), mm, atol=0.01)
        stretches.append((z[0], z[-1]))
    assert len(set(stretches)) == 6 and any(a > 0.0 for a, _ in stretches)
    full = phantom.write_phantom(phantom.Settings(output=str(tmp_path / "f"), **kw))
    z_full = sorted(float(r["z_position"]) for r in csv.DictReader(open(full / "phantom_factors.csv")))
    assert z_full[:6] == [0.0] * 6 and z_full[-6:] == [1.0] * 6
