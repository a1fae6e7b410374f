"""A procedural axial chest-CT phantom in Hounsfield units, written as DICOM in the TCIA LIDC-IDRI layout.

Six known factors drive the anatomy, sampled independently per patient (``z_position`` per slice):

- ``z_position``: 0 at the lung apex, 1 in the upper abdomen (lungs grow then shrink, the heart appears,
  the liver takes over below the diaphragm);
- ``y_offset``: vertical shift of patient and table in mm (table height; positive = towards the image bottom);
- ``rotation``: roll about the body axis in degrees (the patient rotates, the table does not);
- ``thickness``: anterior-posterior body size in mm;  ``width``: left-right body size in mm;
- ``breast_size``: 0 = none, 1 = large (anterior soft tissue, projecting up to 60 mm).

Beyond them, per-patient nuisance (organ sizes and positions, fat thickness, diaphragm level, vessel pattern,
contrast, noise level) gives a generator a real distribution to learn.

Image convention (DICOM, ImageOrientationPatient 1\\0\\0\\0\\1\\0): columns run to the patient's left,
rows to posterior; so the anterior chest is at the top and the patient's right on the image's left.

    python -m latentct.data.phantom --output data/phantom --patients 24 --seed 0
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from latentct.util.io import atomic_write_text, replace_dir, staging_dir
from latentct.util.parallel import pool_map, worker_pool
from latentct.util.settings import UserError, check, run_cli, save_settings, setting

FACTORS = ("z_position", "y_offset", "rotation", "thickness", "width", "breast_size")
# Bumped whenever the renderer changes what a slice shows: trained factor oracles are cached under it.
PHANTOM_VERSION = 1
FACTOR_RANGES = {  # sampling ranges of the patient-level factors (breast_size is 0 for half the patients)
    "y_offset": (-30.0, 30.0),
    "rotation": (-15.0, 15.0),
    "thickness": (180.0, 270.0),
    "width": (270.0, 360.0),
    "breast_size": (0.25, 1.0),
}
FOV_MM = 400.0  # reconstruction diameter
MIN_EXTENT = 0.25  # --extent random: the shortest stretch of the apex-to-abdomen range a series covers
AIR_HU, FAT_HU, SOFT_HU, LUNG_HU = -1000.0, -100.0, 40.0, -850.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
UID_PREFIX = "1.2.826.0.1.3680043.10.1254."  # project prefix; deterministic suffix from the seed


@dataclass
class Settings:
    """Write a synthetic chest-CT collection (DICOM, TCIA layout) with known per-slice factors."""

    output: str = setting("data/phantom", "folder to write the DICOM tree into")
    patients: int = setting(24, "number of patients")
    slices: int = setting(48, "axial slices per CT series, from lung apex to upper abdomen")
    extent: str = setting("full", "what each CT series covers: full (lung apex to upper abdomen) or random (a "
                          "random stretch of at least a quarter of that, as scans differ in extent)",
                          choices=("full", "random"))
    size: int = setting(256, "matrix size of each slice in pixels (LIDC is 512)")
    seed: int = setting(0, "random seed; the same seed writes the same collection")
    repeat_scans: int = setting(1, "patients that get a second CT study (as eight LIDC patients have)")
    radiograph_fraction: float = setting(0.25, "share of patients that also get a DX radiograph series")
    workers: int = setting(1, "processes that write patients in parallel")
    overwrite: bool = setting(False, "replace an existing output folder")

    def __post_init__(self):
        check(self.patients >= 1, "patients", f"needs at least 1 patient, got {self.patients}")
        check(self.slices >= 2, "slices", f"needs at least 2 slices, got {self.slices}")
        check(16 <= self.size <= 2048, "size", f"must be between 16 and 2048, got {self.size}")
        check(0 <= self.repeat_scans <= self.patients, "repeat_scans", "must be between 0 and --patients")
        check(0.0 <= self.radiograph_fraction <= 1.0, "radiograph_fraction", "must be in [0, 1]")
        check(self.workers >= 1, "workers", "must be at least 1")


# ----------------------------------------------------------------------------------------------------------
# Patients: factors and nuisance
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Patient:
    """Everything that is fixed for one patient's scan: the five patient-level factors and the nuisance."""

    y_offset: float
    rotation: float
    thickness: float
    width: float
    breast_size: float
    fat_mm: float            # subcutaneous fat thickness
    lung_scale: float        # lung size relative to the chest cavity
    heart_scale: float
    heart_shift_mm: float    # left-right position of the heart
    liver_scale: float
    diaphragm: float         # z_position at which the lungs end
    vessel_density: float    # spatial frequency of the lung vessel pattern
    vessel_seed: int
    contrast_hu: float       # blood HU (40 without contrast, up to 300 with)
    noise_hu: float          # scanner noise standard deviation
    spine_scale: float
    rib_phase: float
    padding: str             # "none", "signed" or "unsigned": how PixelPaddingValue is stored


def sample_patient(rng: np.random.Generator) -> Patient:
    u = lambda name: float(rng.uniform(*FACTOR_RANGES[name]))  # noqa: E731
    breast = u("breast_size") if rng.random() < 0.5 else 0.0
    return Patient(
        y_offset=u("y_offset"), rotation=u("rotation"), thickness=u("thickness"), width=u("width"),
        breast_size=breast,
        fat_mm=float(rng.uniform(6, 24)), lung_scale=float(rng.uniform(0.85, 1.08)),
        heart_scale=float(rng.uniform(0.8, 1.15)), heart_shift_mm=float(rng.uniform(-5, 25)),
        liver_scale=float(rng.uniform(0.85, 1.15)), diaphragm=float(rng.uniform(0.74, 0.88)),
        vessel_density=float(rng.uniform(6, 11)), vessel_seed=int(rng.integers(2**31)),
        contrast_hu=float(rng.choice([40.0, rng.uniform(150, 300)])), noise_hu=float(rng.uniform(8, 25)),
        spine_scale=float(rng.uniform(0.9, 1.1)), rib_phase=float(rng.uniform(0, 1)),
        padding=str(rng.choice(["none", "signed", "unsigned"])),
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering one slice
# ----------------------------------------------------------------------------------------------------------

def _bump(z: float, start: float, peak: float, end: float) -> float:
    """0 outside [start, end], 1 at peak, smooth (sine) in between."""
    if z <= start or z >= end:
        return 0.0
    t = (z - start) / (peak - start) if z < peak else (end - z) / (end - peak)
    return math.sin(0.5 * math.pi * min(max(t, 0.0), 1.0))


def _ramp(z: float, start: float, end: float) -> float:
    t = min(max((z - start) / (end - start), 0.0), 1.0)
    return t * t * (3 - 2 * t)


def _ellipse(u, v, cu, cv, a, b, power=2.0):
    if a <= 0 or b <= 0:
        return np.zeros(u.shape, dtype=bool)
    return (np.abs((u - cu) / a) ** power + np.abs((v - cv) / b) ** power) <= 1.0


def _smooth_field(shape, cells: float, seed: int, offset: float) -> np.ndarray:
    """A smooth random field of unit scale: random values on a coarse grid, bicubic upsampled.

    ``offset`` slides the coarse grid so that neighbouring slices of a patient share one vessel pattern.
    """
    gen = torch.Generator().manual_seed(seed)
    n = max(int(cells), 2) + 3
    coarse = torch.randn(1, 2, n, n, generator=gen)
    base = coarse[:, :1] * math.cos(offset) + coarse[:, 1:] * math.sin(offset)
    fine = F.interpolate(base, size=(shape[0] + 2 * (shape[0] // n), shape[1] + 2 * (shape[1] // n)),
                         mode="bicubic", align_corners=False)
    cut_r, cut_c = shape[0] // n, shape[1] // n
    return fine[0, 0, cut_r:cut_r + shape[0], cut_c:cut_c + shape[1]].numpy()


@dataclass
class Geometry:
    """Body-frame sizes of one slice in mm; used by the renderer and by tests that need landmarks."""

    half_width: float
    half_thickness: float
    inner_a: float
    inner_b: float
    lung_a: float
    lung_b: float
    lung_u: float
    lung_v: float
    spine_v: float
    spine_r: float
    heart: float
    liver: float
    stomach: float
    breast: float


def slice_geometry(p: Patient, z: float) -> Geometry:
    a = 0.5 * p.width * (0.88 + 0.12 * _bump(z, -0.6, 0.55, 1.6))
    b = 0.5 * p.thickness * (0.9 + 0.1 * _bump(z, -0.6, 0.6, 1.6))
    inner_a, inner_b = a - p.fat_mm, b - p.fat_mm
    lung = p.lung_scale * (_bump(z, -0.05, 0.5, p.diaphragm) ** 0.6)
    return Geometry(
        half_width=a, half_thickness=b, inner_a=inner_a, inner_b=inner_b,
        lung_a=0.36 * inner_a * lung, lung_b=0.66 * inner_b * lung,
        lung_u=0.46 * inner_a, lung_v=-0.02 * inner_b,
        spine_v=b - 62.0 * p.spine_scale, spine_r=17.0 * p.spine_scale,
        heart=p.heart_scale * _bump(z, 0.32, 0.62, min(p.diaphragm + 0.08, 0.98)),
        liver=p.liver_scale * _ramp(z, p.diaphragm - 0.14, p.diaphragm + 0.12),
        stomach=_ramp(z, p.diaphragm - 0.02, p.diaphragm + 0.15),
        breast=p.breast_size * _bump(z, 0.22, 0.5, 0.8),
    )


def visible_factors(p: Patient, z: float) -> list[float]:
    """The six factors as one slice shows them (the oracle's targets, in FACTORS order): z, table height,
    roll, AP and LR size, and the breasts' *visible* projection, breast_size times its z profile (no breast
    shows outside z in about 0.22-0.8, so a slice there cannot tell its patient's breast size)."""
    return [z, p.y_offset, p.rotation, p.thickness, p.width, slice_geometry(p, z).breast]


def body_to_image(p: Patient, u: float, v: float) -> tuple[float, float]:
    """Body-frame mm (u to the patient's left, v posterior) to image-frame mm about the isocentre."""
    t = math.radians(p.rotation)
    return u * math.cos(t) - v * math.sin(t), u * math.sin(t) + v * math.cos(t) + p.y_offset


def landmarks(p: Patient, z: float) -> dict[str, tuple[float, float]]:
    """Image-frame mm (x to image right, y to image bottom, 0 at the centre) of points inside organs."""
    g = slice_geometry(p, z)
    lateral = g.lung_u + 0.4 * g.lung_a  # inside each lung, clear of the heart and mediastinum
    pts = {"body": (0.0, 0.0), "right_lung": (-lateral, g.lung_v), "left_lung": (lateral, g.lung_v),
           "spine": (0.0, g.spine_v), "anterior_skin": (0.0, -g.half_thickness), "liver": (-0.3 * g.inner_a, 0.05 * g.inner_b)}
    return {k: body_to_image(p, *uv) for k, uv in pts.items()}


def render_slice(p: Patient, z: float, size: int, rng: np.random.Generator, fov_mm: float = FOV_MM,
                 fine: bool = True) -> np.ndarray:
    """One axial slice in HU (float32, size x size) at z_position ``z`` of patient ``p``. ``fine=False`` leaves
    out the lung vessels, the ribs and the sternum (the detail a VAE's reconstructions lose; bench.oracle_reading),
    every other pixel and the noise as they are."""
    spacing = fov_mm / size
    coords = (np.arange(size, dtype=np.float32) + 0.5) * spacing - fov_mm / 2
    x, y = np.meshgrid(coords, coords)  # x: columns (patient left), y: rows (posterior)
    t = math.radians(p.rotation)
    yy = y - p.y_offset
    u = x * math.cos(t) + yy * math.sin(t)
    v = -x * math.sin(t) + yy * math.cos(t)
    g = slice_geometry(p, z)
    img = np.full((size, size), AIR_HU, dtype=np.float32)

    # Table: a curved carbon-fibre shell with foam core under the patient; it does not roll with them.
    top = p.y_offset + g.half_thickness + 4.0 - 0.00025 * x**2  # curved upwards at the sides
    img[(y >= top) & (y < top + 12)] = -750.0
    img[(y >= top) & (y < top + 2)] = 250.0
    img[(y >= top + 10) & (y < top + 12)] = 250.0

    # Body: a superellipse (flatter back), breasts in front, subcutaneous fat, then soft tissue inside.
    back = np.where(v > 0, 3.0, 2.2)
    body = (np.abs(u / g.half_width) ** back + np.abs(v / g.half_thickness) ** back) <= 1.0
    inner = (np.abs(u / g.inner_a) ** back + np.abs(v / g.inner_b) ** back) <= 1.0
    breasts = np.zeros_like(body)
    glands = np.zeros_like(body)
    if g.breast > 0:
        depth, radius = 60.0 * g.breast, 35.0 + 30.0 * g.breast
        for side in (-1, 1):
            cu, cv = side * 0.42 * g.half_width, -g.half_thickness + 8.0
            breasts |= _ellipse(u, v, cu, cv, radius, depth + 8.0) & (v < cv + 10)
            glands |= _ellipse(u, v, cu, cv - 0.35 * depth, 0.55 * radius, 0.45 * depth + 3.0)
    img[body | breasts] = FAT_HU
    img[glands & breasts] = 25.0
    img[inner] = SOFT_HU + 15.0  # muscle wall

    cavity = _ellipse(u, v, 0, 0, g.inner_a - 14.0, g.inner_b - 14.0, power=2.4)
    img[cavity] = SOFT_HU

    # Upper abdomen: liver on the patient's right, stomach with an air-fluid level on the left.
    if g.liver > 0:
        img[_ellipse(u, v, -0.28 * g.inner_a, 0.02 * g.inner_b, 0.58 * g.inner_a * g.liver,
                     0.72 * g.inner_b * g.liver) & cavity] = 62.0
    if g.stomach > 0:
        su, sv, sr = 0.36 * g.inner_a, -0.25 * g.inner_b, 0.26 * g.inner_a * g.stomach
        stomach = _ellipse(u, v, su, sv, sr, 0.8 * sr) & cavity
        img[stomach] = 22.0
        img[stomach & (v < sv - 0.35 * sr)] = AIR_HU

    # Lungs with a vessel pattern: thin bands at the zero crossings of a smooth random field.
    lungs = _ellipse(u, v, -g.lung_u, g.lung_v, g.lung_a, g.lung_b, 2.2) | \
        _ellipse(u, v, g.lung_u, g.lung_v, g.lung_a, g.lung_b, 2.2)
    heart_a, heart_b = 0.34 * g.inner_a * g.heart, 0.36 * g.inner_b * g.heart
    heart_u, heart_v = p.heart_shift_mm, -0.22 * g.inner_b
    heart = _ellipse(u, v, heart_u, heart_v, heart_a, heart_b) if g.heart > 0 else np.zeros_like(body)
    mediastinum = _ellipse(u, v, 0.0, 0.0, 0.16 * g.inner_a, g.inner_b)
    lungs &= ~(heart | mediastinum) & cavity
    if lungs.any():
        rows, cols = np.nonzero(lungs)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        cells = p.vessel_density * (r1 - r0) * spacing / 100.0
        field = _smooth_field((r1 - r0, c1 - c0), cells, p.vessel_seed, 6.0 * z)
        vessels = np.exp(-(field / 0.09) ** 2) if fine else 0.0
        patch = LUNG_HU + 760.0 * vessels + 25.0 * field
        region = lungs[r0:r1, c0:c1]
        img[r0:r1, c0:c1][region] = patch[region]

    # Heart (myocardium and blood pool), descending aorta beside the spine.
    if g.heart > 0:
        img[heart] = 45.0
        img[_ellipse(u, v, heart_u + 3, heart_v, 0.7 * heart_a, 0.68 * heart_b)] = p.contrast_hu
    aorta_u, aorta_v = 22.0, g.spine_v - 32.0 * p.spine_scale
    img[_ellipse(u, v, aorta_u, aorta_v, 12.0, 12.0) & cavity] = p.contrast_hu

    # Spine: vertebral body (cortex and cancellous bone), canal, spinous process.
    r = g.spine_r
    img[_ellipse(u, v, 0, g.spine_v, r, r * 0.9)] = 800.0
    img[_ellipse(u, v, 0, g.spine_v, r - 3.0, r * 0.9 - 3.0)] = 260.0
    img[_ellipse(u, v, 0, g.spine_v + r + 10, 9.0, 8.0)] = 20.0
    img[_ellipse(u, v, 0, g.spine_v + r + 27, 5.0, 12.0) & inner] = 650.0
    for side in (-1, 1):
        img[_ellipse(u, v, side * (r + 9), g.spine_v + r + 6, 12.0, 5.0)] = 600.0

    # Ribs: bone ovals along the chest wall, fewer below the diaphragm; the sternum in front.
    if fine and z < p.diaphragm + 0.12:
        count = 7
        for side in (-1, 1):
            for i in range(count):
                ang = math.radians(25 + 135 * (i + (p.rib_phase + 3.0 * z) % 1.0) / count)
                ru = side * (g.inner_a - 7.0) * math.sin(ang)
                rv = -(g.inner_b - 7.0) * math.cos(ang)
                if abs(ru) < 0.25 * g.inner_a and rv < 0:
                    continue
                img[_ellipse(u, v, ru, rv, 6.0, 4.0)] = 700.0
    if fine and 0.08 < z < p.diaphragm:
        img[_ellipse(u, v, 0, -g.inner_b + 6.0, 13.0, 6.0)] = 500.0

    # Scanner noise, slightly correlated, as reconstruction kernels leave it.
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = 0.5 * noise + 0.25 * (np.roll(noise, 1, 0) + np.roll(noise, 1, 1))
    img += p.noise_hu * 1.6 * noise
    return np.clip(img, -1024.0, 3071.0)


def as_read_back(hu: np.ndarray, padding: str, fov_mm: float = FOV_MM) -> np.ndarray:
    """A rendered slice as preprocessing reads it back from the DICOM this module writes: integer HU, and with
    a PixelPaddingValue the pixels outside the reconstruction circle at the HU floor (-1024)."""
    out = np.round(hu).astype(np.float32)
    if padding != "none":
        size = hu.shape[-1]
        centre = (np.arange(size) + 0.5 - size / 2) * (fov_mm / size)
        out[(centre[None, :] ** 2 + centre[:, None] ** 2) > (fov_mm / 2) ** 2] = -1024.0
    return np.clip(out, -1024.0, 3071.0)


def render_radiograph(p: Patient, size: int = 256) -> np.ndarray:
    """A frontal chest radiograph (DX decoy): dark lungs in a bright body, bright spine, as uint16."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(coords, coords)
    w = p.width / 400.0
    img = np.full((size, size), 200.0)
    img[np.abs(x) < w] = 2600.0
    for side in (-1, 1):
        img[_ellipse(x, y, side * 0.45 * w, -0.05, 0.35 * w, 0.6)] = 900.0
    img[np.abs(x) < 0.06] = 3600.0
    return img.astype(np.uint16)


# ----------------------------------------------------------------------------------------------------------
# DICOM writing in the TCIA layout
# ----------------------------------------------------------------------------------------------------------

def _uid(seed: int, *parts) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(seed), *map(str, parts)])


def _base_dataset(sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _patient_tags(ds: Dataset, patient_id: str, study_uid: str, study_date: str) -> None:
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.Manufacturer = "LatentCT phantom"


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, patient_id: str, p: Patient, settings: Settings, rng: np.random.Generator,
                    seed_parts: tuple, study_uid: str, study_date: str, series_number: int) -> list[dict]:
    """Write one CT series (files named out of z order); return the ground-truth rows, one per slice."""
    size, n = settings.size, settings.slices
    spacing = FOV_MM / size
    scan_length = float(rng.uniform(260.0, 330.0))
    z_top = float(rng.uniform(-80.0, -40.0))  # table position of the lung apex, mm
    first, last = 0.0, 1.0  # the stretch of the apex-to-abdomen range (z_position 0 to 1) the series covers
    if settings.extent == "random":
        first = float(rng.uniform(0.0, 1.0 - MIN_EXTENT))
        last = float(rng.uniform(first + MIN_EXTENT, 1.0))
    slice_thickness = (last - first) * scan_length / (n - 1)
    series_uid = _uid(settings.seed, *seed_parts, "series")
    frame_uid = _uid(settings.seed, *seed_parts, "frame")
    names = rng.permutation(n) + 1  # file names deliberately not in z order
    pad_stored = -2000 - (-1024)  # stored value of the padding outside the reconstruction circle
    centre = (np.arange(size) + 0.5 - size / 2) * spacing
    outside = (centre[None, :] ** 2 + centre[:, None] ** 2) > (FOV_MM / 2) ** 2
    rows = []
    for k in range(n):
        z = first + (last - first) * k / (n - 1)
        hu = render_slice(p, z, size, rng)
        stored = np.round(hu).astype(np.int32) + 1024
        if p.padding != "none":
            stored[outside] = pad_stored
        sop_uid = _uid(settings.seed, *seed_parts, "slice", k)
        ds = _base_dataset(CT_IMAGE_STORAGE, sop_uid)
        _patient_tags(ds, patient_id, study_uid, study_date)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = "Chest phantom"
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        z_mm = z_top - first * scan_length - k * slice_thickness  # superior first: DICOM +z points to the head
        ds.ImagePositionPatient = [-FOV_MM / 2 + spacing / 2, -FOV_MM / 2 + spacing / 2, round(z_mm, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z_mm, 3)
        ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
        ds.SliceThickness = round(slice_thickness, 3)
        ds.KVP = 120
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1600
        if p.padding == "signed":
            ds.add_new(0x00280120, "SS", pad_stored)
        elif p.padding == "unsigned":  # as some scanners do: the signed value stored as US
            ds.add_new(0x00280120, "US", pad_stored & 0xFFFF)
        ds.PixelData = stored.astype(np.int16).tobytes()
        _write(ds, folder / f"1-{names[k]:03d}.dcm")
        rows.append({"sop_uid": sop_uid, "patient_id": patient_id, "series_uid": series_uid, "z_mm": round(z_mm, 3),
                     "z_position": round(z, 6), "y_offset": round(p.y_offset, 4), "rotation": round(p.rotation, 4),
                     "thickness": round(p.thickness, 4), "width": round(p.width, 4),
                     "breast_size": round(p.breast_size, 4)})
    return rows


def write_annotation_xml(path: Path, patient_id: str, series_uid: str) -> None:
    """An LIDC-style reader annotation file next to the slices (preprocessing must skip it)."""
    atomic_write_text(path, (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<LidcReadMessage uid="phantom" xmlns="http://www.nih.gov">\n'
        f'  <ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid>'
        f'<PatientID>{patient_id}</PatientID></ResponseHeader>\n'
        '  <readingSession><annotationVersion>3.12</annotationVersion></readingSession>\n'
        '</LidcReadMessage>\n'))


def write_radiograph(folder: Path, patient_id: str, p: Patient, seed: int, idx: int, study_date: str) -> None:
    study_uid = _uid(seed, idx, "dx-study")
    ds = _base_dataset(DX_IMAGE_STORAGE, _uid(seed, idx, "dx-image"))
    _patient_tags(ds, patient_id, study_uid, study_date)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = _uid(seed, idx, "dx-series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    image = render_radiograph(p)
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [1.4, 1.4]
    ds.PixelData = image.tobytes()
    _write(ds, folder / "1-1.dcm")


def _folder_code(rng: np.random.Generator) -> int:
    return int(rng.integers(10000, 99999))


def patient_rng(seed: int, idx: int) -> np.random.Generator:
    return np.random.default_rng([seed, idx])


def patient_for(seed: int, idx: int) -> Patient:
    """The patient (factors and nuisance) that ``--seed seed`` writes as number ``idx`` (0-based)."""
    return sample_patient(patient_rng(seed, idx))


def write_patient(args: tuple) -> list[dict]:
    """All of one patient's studies; run in a worker process. Returns the patient's ground-truth rows."""
    settings, idx, root = args
    torch.set_num_threads(1)
    rng = patient_rng(settings.seed, idx)
    patient = sample_patient(rng)
    patient_id = f"LIDC-IDRI-{idx + 1:04d}"
    studies = 2 if idx < settings.repeat_scans else 1
    wants_dx = rng.random() < settings.radiograph_fraction
    rows = []
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3000)))
    for s in range(studies):
        date = day + datetime.timedelta(days=200 * s)
        scan = dataclasses.replace(patient, noise_hu=float(rng.uniform(8, 25))) if s else patient
        study_uid = _uid(settings.seed, idx, s, "study")
        study_dir = root / patient_id / f"{date:%m-%d-%Y}-NA-NA-{_folder_code(rng)}"
        series_number = 3000566 + int(rng.integers(0, 5000))
        series_dir = study_dir / f"{series_number}.000000-NA-{_folder_code(rng)}"
        rows += write_ct_series(series_dir, patient_id, scan, settings, rng, (idx, s), study_uid,
                                f"{date:%Y%m%d}", series_number)
        write_annotation_xml(series_dir / f"{int(rng.integers(1, 999)):03d}.xml", patient_id, rows[-1]["series_uid"])
    if wants_dx:
        date = day - datetime.timedelta(days=30)
        dx_dir = root / patient_id / f"{date:%m-%d-%Y}-NA-CHEST-{_folder_code(rng)}" / f"1.000000-NA-{_folder_code(rng)}"
        write_radiograph(dx_dir, patient_id, patient, settings.seed, idx, f"{date:%Y%m%d}")
    return rows


def write_phantom(settings: Settings) -> Path:
    """Write the whole collection atomically (a staging folder renamed into place); return its path."""
    final = Path(settings.output)
    if final.exists() and not settings.overwrite:
        raise UserError(f"{final}: output folder exists; pass --overwrite to replace it")
    staging = staging_dir(final)
    jobs = [(settings, idx, staging) for idx in range(settings.patients)]
    rows: list[dict] = []
    try:
        with worker_pool(settings.workers) as pool:
            for result in pool_map(write_patient, jobs, pool, "phantom", "patient"):
                rows += result
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(staging / "phantom_factors.csv", buf.getvalue())
        save_settings(settings, staging / "config.json")
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def main(cfg: Settings) -> Path:
    out = write_phantom(cfg)
    print(f"phantom: {cfg.patients} patients x {cfg.slices} slices of {cfg.size}px written to {out}")
    return out


def summary_line(output: Path) -> str:
    """The pipeline's one line for this stage."""
    with open(Path(output) / "phantom_factors.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return f"{len(rows)} slices of {len({r['patient_id'] for r in rows})} patients"


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.data.phantom")
