import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import PHANTOM
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless

import preprocess
from latentct.data import phantom
from latentct.data.slices import read_index
from latentct.util.settings import UserError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def run(src, out, **kw):
    kw.setdefault("size", 32)
    kw.setdefault("workers", 1)
    return preprocess.main(preprocess.Settings(input=str(src), output=str(out), **kw))


def manifest(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


def reasons(folder):
    return {s["file"]: s["reason"] for s in manifest(folder)["skipped"]}


def ct_files(tree):
    return sorted(p for p in Path(tree).rglob("*.dcm")
                  if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")


def copy_patients(phantom_tree, dest, patients=("LIDC-IDRI-0002", "LIDC-IDRI-0003")):
    for p in patients:
        shutil.copytree(phantom_tree / p, dest / p)
    shutil.copy(phantom_tree / "phantom_factors.csv", dest)
    return dest


# ------------------------------------------------------------------------------------------ round trip

def test_every_ct_slice_kept_and_split_by_patient(dataset):
    m = manifest(dataset)
    total = (PHANTOM["patients"] + PHANTOM["repeat_scans"]) * PHANTOM["slices"]
    assert m["counts"]["slices"]["train"] + m["counts"]["slices"]["test"] == total
    train, test = read_index(dataset, "train"), read_index(dataset, "test")
    assert np.load(dataset / "train.npy", mmap_mode="r").shape == (len(train), 1, 32, 32)
    assert np.load(dataset / "test.npy", mmap_mode="r").dtype == np.int16
    assert {r["patient_id"] for r in train}.isdisjoint({r["patient_id"] for r in test})
    assert len(test) > 0
    # the patient with two CT studies sits wholly in one split
    both = [r for r in train + test if r["patient_id"] == "LIDC-IDRI-0001"]
    assert len({r["series_uid"] for r in both}) == 2 and len(both) == 2 * PHANTOM["slices"]
    assert len({r["patient_id"] for r in train}) + len({r["patient_id"] for r in test}) == PHANTOM["patients"]
    assert all(s["reason"] in ("not a DICOM file", "not CT (Modality DX)") for s in m["skipped"])


def test_slices_sorted_superior_to_inferior_with_positions_kept(dataset):
    rows = read_index(dataset, "train")
    for series in {r["series_uid"] for r in rows}:
        mine = [r for r in rows if r["series_uid"] == series]
        assert [int(r["slice_index"]) for r in mine] == list(range(len(mine)))
        z = [float(r["z_mm"]) for r in mine]
        assert z == sorted(z, reverse=True)
        assert [float(r["z_position"]) for r in mine] == sorted(float(r["z_position"]) for r in mine)
        assert float(mine[0]["z_rel"]) == 0.0 and float(mine[-1]["z_rel"]) == 1.0


def test_factor_columns_carried_by_sop_uid(dataset, phantom_tree):
    truth = {r["sop_uid"]: r for r in csv.DictReader(open(phantom_tree / "phantom_factors.csv"))}
    for row in read_index(dataset, "train") + read_index(dataset, "test"):
        for factor in phantom.FACTORS:
            assert row[factor] == truth[row["sop_uid"]][factor]
        assert float(row["pixel_spacing_mm"]) == pytest.approx(phantom.FOV_MM / 32, rel=1e-4)


def test_hu_of_known_regions_after_resize(dataset):
    seed, size = PHANTOM["seed"], 32
    array = {s: np.load(dataset / f"{s}.npy") for s in ("train", "test")}
    checked = 0
    for split in ("train", "test"):
        for i, row in enumerate(read_index(dataset, split)):
            img = array[split][i, 0]
            assert img[0, 0] < -950 and img[0, -1] < -950  # air or padding, never wrapped to bone
            z = float(row["z_position"])
            if not 0.35 <= z <= 0.65 or "0001" in row["patient_id"]:
                continue
            p = phantom.patient_for(seed, int(row["patient_id"][-4:]) - 1)
            spacing = phantom.FOV_MM / size
            marks = phantom.landmarks(p, z)
            px = lambda xy: (int((xy[1] + 200) / spacing), int((xy[0] + 200) / spacing))  # noqa: E731
            assert img[px(marks["right_lung"])] < -500 and img[px(marks["left_lung"])] < -500
            assert img[px(marks["spine"])] > 100
            checked += 1
    assert checked >= 4


def test_workers_give_identical_output(phantom_tree, dataset, tmp_path):
    out = run(phantom_tree, tmp_path / "par", test_fraction=0.4, workers=2)
    for name in ("train.npy", "test.npy", "train_index.csv", "test_index.csv"):
        assert (out / name).read_bytes() == (dataset / name).read_bytes()


def test_patient_lists_define_the_split(phantom_tree, tmp_path):
    (tmp_path / "train.txt").write_text("LIDC-IDRI-0001\nLIDC-IDRI-0002\n")
    (tmp_path / "test.txt").write_text("LIDC-IDRI-0004\n")
    out = run(phantom_tree, tmp_path / "out", train_patients=str(tmp_path / "train.txt"),
              test_patients=str(tmp_path / "test.txt"))
    assert {r["patient_id"] for r in read_index(out, "test")} == {"LIDC-IDRI-0004"}
    assert {r["patient_id"] for r in read_index(out, "train")} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002"}
    assert any("neither patient list" in r for r in reasons(out).values())
    (tmp_path / "test.txt").write_text("LIDC-IDRI-0002\n")
    with pytest.raises(UserError, match="both list LIDC-IDRI-0002"):
        run(phantom_tree, tmp_path / "out2", train_patients=str(tmp_path / "train.txt"),
            test_patients=str(tmp_path / "test.txt"))


# ------------------------------------------------------------------------------------------ atomic output

def test_existing_output_needs_overwrite(phantom_tree, dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    with pytest.raises(UserError, match="--overwrite"):
        run(phantom_tree, out)
    before = (out / "train.npy").read_bytes()
    run(phantom_tree, out, overwrite=True, size=16)
    assert np.load(out / "train.npy").shape[-1] == 16 and before != (out / "train.npy").read_bytes()


def test_interrupted_run_leaves_no_output(phantom_tree, tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "_index_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        run(phantom_tree, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder


# ------------------------------------------------------------------------------------------ bad input

def test_missing_input_and_tree_without_ct(tmp_path, phantom_tree):
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "out")
    tree = tmp_path / "noct"
    dx = next(p for p in phantom_tree.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "DX")
    (tree / "a").mkdir(parents=True)
    shutil.copy(dx, tree / "a" / "dx.dcm")
    (tree / "a" / "069.xml").write_text("<xml/>")
    with pytest.raises(UserError, match="no axial CT slices found"):
        run(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_files_are_skipped_with_reasons_and_good_slices_kept(phantom_tree, tmp_path):
    tree = copy_patients(phantom_tree, tmp_path / "tree")
    files = ct_files(tree)
    good_total = len(files)
    series_dir = files[0].parent
    (series_dir / "empty.dcm").write_bytes(b"")
    (series_dir / "notes.txt").write_text("reader notes, not DICOM\n")
    (series_dir / "NOEXTENSION").write_bytes(files[0].read_bytes())  # a valid slice without extension
    # a slice that duplicates one position would be dropped: give the copy its own position instead
    ds = pydicom.dcmread(series_dir / "NOEXTENSION")
    ds.SOPInstanceUID = ds.SOPInstanceUID[:-3] + "999"
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.5
    ds.save_as(series_dir / "NOEXTENSION")
    truncated = files[1].read_bytes()
    files[1].write_bytes(truncated[: len(truncated) - 500])
    corrupt = bytearray(files[2].read_bytes())
    corrupt[132:400] = os.urandom(268)
    files[2].write_bytes(bytes(corrupt))
    out = run(tree, tmp_path / "out", test_fraction=0.0)
    why = reasons(out)
    rel = lambda p: str(p.relative_to(tree))  # noqa: E731
    assert why[rel(series_dir / "empty.dcm")] == "empty file (0 bytes)"
    assert why[rel(series_dir / "notes.txt")] == "not a DICOM file"
    assert "truncated" in why[rel(files[1])]
    assert rel(files[2]) in why
    kept = manifest(out)["counts"]["slices"]["train"]
    assert kept == good_total - 2 + 1
    assert (out / "preprocess.log").read_text().count("skipped ") == len(why)


def test_duplicate_positions_dropped_and_gaps_recorded(phantom_tree, tmp_path):
    tree = copy_patients(phantom_tree, tmp_path / "tree", patients=("LIDC-IDRI-0002",))
    files = sorted(ct_files(tree), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ds.SOPInstanceUID[:-3] + "998"
    ds.save_as(tree / "duplicate.dcm")
    files[6].unlink()  # a missing slice leaves a gap
    out = run(tree, tmp_path / "out", test_fraction=0.0)
    assert sum("duplicate slice position" in r for r in reasons(out).values()) == 1
    assert manifest(out)["counts"]["slices"]["train"] == PHANTOM["slices"] - 1
    gaps = manifest(out)["series"][0]["gaps"]
    assert len(gaps) == 1 and gaps[0]["gap_mm"] == pytest.approx(2 * gaps[0]["median_spacing_mm"], rel=0.01)


def test_missing_intercept_assumed_zero_and_compressed_slices(phantom_tree, tmp_path):
    tree = copy_patients(phantom_tree, tmp_path / "tree", patients=("LIDC-IDRI-0002",))
    files = ct_files(tree)
    ds = pydicom.dcmread(files[0])
    del ds.RescaleIntercept
    ds.save_as(files[0])
    rle = pydicom.dcmread(files[1])
    rle.compress(RLELossless)  # RLE decodes with pydicom alone
    rle.save_as(files[1])
    jls_source = pydicom.dcmread(PYDICOM_FILES / "JPEGLSNearLossless_16.dcm")
    jls = pydicom.dcmread(files[2])
    jls.file_meta.TransferSyntaxUID = JPEGLSLossless
    jls.PixelData = encapsulate([jls_source.PixelData[16:]])
    jls["PixelData"].VR = "OB"
    jls.save_as(files[2], enforce_file_format=False)
    out = run(tree, tmp_path / "out", test_fraction=0.0)
    m = manifest(out)
    assert m["counts"]["slices"]["train"] == PHANTOM["slices"] - 1
    jls_reason = reasons(out)[str(files[2].relative_to(tree))]
    assert "JPEG-LS" in jls_reason and "pip install" in jls_reason
    assert [w["warning"] for w in m["warnings"]] == ["RescaleIntercept missing; assumed 0"]


# ------------------------------------------------------------------------------------------ real data

def test_pydicom_example_ct(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(pydicom.examples.get_path("ct"), tree / "image")
    out = run(tree, tmp_path / "out", test_fraction=0.0)
    ds = pydicom.examples.ct
    expected = np.clip(ds.pixel_array.astype(np.float32) * ds.RescaleSlope + ds.RescaleIntercept, -1024, 3071)
    got = np.load(out / "train.npy")[0, 0]
    # a 128 -> 32 anti-aliased resize keeps the mean HU of the image
    assert got.mean() == pytest.approx(expected.mean(), abs=5)
    assert read_index(out, "train")[0]["patient_id"] == str(ds.PatientID)


def test_pydicom_dicomdir_series_with_localizers_and_decoys(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests", tree)
    out = run(tree, tmp_path / "out", test_fraction=0.5, size=16)
    m = manifest(out)
    rows = read_index(out, "train") + read_index(out, "test")
    assert len(rows) == 9  # the axial CT slices of 77654033/CT2 (4) and 98892001/CT5N (5)
    assert {r["patient_id"] for r in rows} == {"77654033", "98890234"}
    why = m["skipped"]
    assert sum("localizer" in s["reason"] for s in why) == 2
    assert sum(s["reason"] == "not CT (Modality CR)" for s in why) == 3
    assert sum(s["reason"] == "not CT (Modality MR)" for s in why) >= 10
    assert any(s["reason"] == "no image (Rows/Columns missing)" for s in why)
    ct2 = [s for s in m["series"] if s["patient_id"] == "77654033"][0]
    assert ct2["slices"] == 4 and len(ct2["gaps"]) == 1  # -99.5 mm then 103-105.5 mm


def test_staging_left_by_a_killed_run_is_cleaned(phantom_tree, tmp_path):
    stale = tmp_path / ".out.staging-999999999"  # no such process
    stale.mkdir()
    (stale / "train.npy").write_bytes(b"half")
    run(phantom_tree, tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "manifest.json").is_file()


def test_unsigned_padding_value_in_a_signed_image_becomes_air(phantom_tree):
    from latentct.data.dicom import read_hu

    idx = next(i for i in range(PHANTOM["patients"]) if phantom.patient_for(PHANTOM["seed"], i).padding == "unsigned")
    path = next((phantom_tree / f"LIDC-IDRI-{idx + 1:04d}").rglob("1-001.dcm"))
    ds = pydicom.dcmread(path)
    assert ds["PixelPaddingValue"].VR == "US" and ds.PixelPaddingValue == (-976) & 0xFFFF and ds.PixelRepresentation == 1
    assert ds.pixel_array[0, 0] == -976  # the signed padding value -2000 + 1024, outside the scan circle
    hu, _ = read_hu(str(path))
    assert hu[0, 0] == -1024 and hu[ds.Rows // 2, 2] > -1024  # padding is air; the scan circle is kept
