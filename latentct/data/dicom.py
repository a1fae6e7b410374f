"""Reading CT series from a DICOM tree: discovery by headers, series grouping, slice order, pixels to HU.

Identity comes from DICOM tags, never from folder names. Every problem with a file becomes a
``Skip(file, reason)``; no single file can stop the run.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError

HU_MIN, HU_MAX = -1024, 3071
POSITION_TOLERANCE_MM = 0.01
RESIZE_CHUNK = 16  # slices resized together; bounds worker memory for 512 px series

# Transfer syntaxes pydicom cannot decode by itself, with what to install for them.
DECODER_PACKAGES = {
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG Lossless": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG Extended": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG Baseline": "pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
}


@dataclass
class Skip:
    file: str
    reason: str


@dataclass
class SliceHeader:
    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    acquisition: str
    rows: int
    columns: int
    position: float          # along the slice normal, oriented so that larger is superior
    z_mm: float
    pixel_spacing: float     # row spacing, mm
    instance: int


@dataclass
class Series:
    key: tuple
    slices: list[SliceHeader]                       # sorted superior to inferior, duplicates removed
    gaps: list[dict] = field(default_factory=list)  # where spacing jumps over 1.5x the median


def read_header(path: str) -> SliceHeader | Skip:
    """Classify one file from its header alone (no pixels are read)."""
    try:
        if os.path.getsize(path) == 0:
            return Skip(path, "empty file (0 bytes)")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return Skip(path, "not a DICOM file")
    except Exception as err:  # pydicom raises many types for broken headers
        return Skip(path, f"unreadable DICOM header: {type(err).__name__}: {err}")
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        return Skip(path, f"not CT (Modality {modality or 'missing'})")
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return Skip(path, "CT localizer (scout), not an axial slice")
    if "Rows" not in ds or "Columns" not in ds:
        return Skip(path, "no image (Rows/Columns missing)")
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
        return Skip(path, "no ImageOrientationPatient/ImagePositionPatient")
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    if abs(normal[2]) < 0.9:
        return Skip(path, "not an axial slice (ImageOrientationPatient not transverse)")
    if normal[2] < 0:
        normal = -normal
    spacing = ds.get("PixelSpacing") or [1.0, 1.0]
    return SliceHeader(
        path=path, patient_id=str(ds.get("PatientID", "")) or "UNKNOWN",
        study_uid=str(ds.get("StudyInstanceUID", "")), series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")), acquisition=str(ds.get("AcquisitionNumber", "") or ""),
        rows=int(ds.Rows), columns=int(ds.Columns), position=float(np.dot(np.array(ipp, float), normal)),
        z_mm=float(ipp[2]), pixel_spacing=float(spacing[0]), instance=int(ds.get("InstanceNumber") or 0),
    )


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (extension or not), in a stable order."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.append(path)
    return found


def _split_acquisitions(slices: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Separate acquisitions only where they cover the same positions (a repeated scan in one series).

    Sequential (step-and-shoot) scans number every rotation as its own acquisition without overlap;
    those stay one volume.
    """
    by_acq: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in slices:
        by_acq[h.acquisition].append(h)
    if len(by_acq) == 1:
        return [slices]
    seen: dict[int, str] = {}
    for acq, members in by_acq.items():
        for h in members:
            key = round(h.position / POSITION_TOLERANCE_MM)
            if seen.get(key, acq) != acq:
                return [by_acq[a] for a in sorted(by_acq)]
            seen[key] = acq
    return [slices]


def group_series(headers: list[SliceHeader]) -> tuple[list[Series], list[Skip]]:
    """Group slices by series (and overlapping acquisitions) and matrix size; sort superior to inferior;
    drop duplicate positions; record gaps."""
    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[(h.patient_id, h.study_uid, h.series_uid, h.rows, h.columns)].append(h)
    series, skips = [], []
    for key in sorted(groups):
        parts = _split_acquisitions(groups[key])
        for part in parts:
            part_key = key + ((part[0].acquisition,) if len(parts) > 1 else ("",))
            kept, dropped = _sort_unique(part)
            skips += dropped
            series.append(Series(key=part_key, slices=kept, gaps=_gaps(kept)))
    return series, skips


def _sort_unique(part: list[SliceHeader]) -> tuple[list[SliceHeader], list[Skip]]:
    ordered = sorted(part, key=lambda h: (-h.position, h.instance, h.path))
    kept: list[SliceHeader] = []
    dropped = []
    for h in ordered:
        if kept and abs(kept[-1].position - h.position) < POSITION_TOLERANCE_MM:
            dropped.append(Skip(h.path, f"duplicate slice position {h.position:.3f} mm in series "
                                        f"{h.series_uid} (kept {os.path.basename(kept[-1].path)})"))
            continue
        kept.append(h)
    return kept, dropped


def _gaps(kept: list[SliceHeader]) -> list[dict]:
    steps = np.diff([-h.position for h in kept])
    gaps = []
    if len(steps) >= 2:
        median = float(np.median(steps))
        for i in np.nonzero(steps > 1.5 * median)[0]:
            gaps.append({"after_z_mm": kept[i].z_mm, "before_z_mm": kept[i + 1].z_mm,
                         "gap_mm": round(float(steps[i]), 3), "median_spacing_mm": round(median, 3)})
    return gaps


def _decoder_hint(ds) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = syntax.name if syntax is not None else "unknown transfer syntax"
    for key, package in DECODER_PACKAGES.items():
        if key.lower() in name.lower():
            return f"compressed ({name}) and no decoder is installed: pip install {package}"
    return ""


def read_hu(path: str) -> tuple[np.ndarray, list[str]] | Skip:
    """Pixels of one slice in HU (float32, clipped to [-1024, 3071]) and any warnings about the file."""
    warnings = []
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        return Skip(path, f"unreadable DICOM: {type(err).__name__}: {err}")
    if "PixelData" not in ds:
        return Skip(path, "no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as err:
        hint = _decoder_hint(ds)
        if hint and ("decod" in str(err).lower() or "plugin" in str(err).lower() or "handler" in str(err).lower()):
            return Skip(path, hint)
        return Skip(path, f"corrupt or truncated pixel data: {type(err).__name__}: {str(err).splitlines()[0]}")
    if raw.ndim != 2:
        return Skip(path, f"expected one 2-D frame, got pixel array of shape {raw.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    if "RescaleIntercept" not in ds:
        warnings.append("RescaleIntercept missing; assumed 0")
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = raw.astype(np.float32) * slope + intercept
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        pad = int(pad)
        if int(ds.get("PixelRepresentation", 0)) == 1 and pad > 32767:
            pad -= 65536  # a signed padding value stored as unsigned (VR US) in a signed image
        hu[raw == pad] = HU_MIN
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, warnings


def resize_slices(hu: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) float HU to (n, size, size) int16 HU with an anti-aliased bilinear filter."""
    x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
    if x.shape[-2:] != (size, size):
        downsampling = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)
    return x[:, 0].round_().clamp_(HU_MIN, HU_MAX).to(torch.int16).numpy()


def read_series(job: tuple) -> tuple:
    """Worker: HU pixels of one series' slices, resized. Returns (series number, array, kept flags, skips, warnings)."""
    number, paths, size = job
    torch.set_num_threads(1)
    blocks, kept, skips, warnings, pending = [], [], [], [], []

    def flush():
        if pending:
            blocks.append(resize_slices(np.stack(pending), size))
            pending.clear()

    shape = None
    for path in paths:
        result = read_hu(path)
        if isinstance(result, Skip):
            skips.append(result)
            kept.append(False)
            continue
        hu, notes = result
        if shape is not None and hu.shape != shape:
            skips.append(Skip(path, f"pixel array {hu.shape} differs from the series' {shape}"))
            kept.append(False)
            continue
        shape = hu.shape
        warnings += [(path, note) for note in notes]
        pending.append(hu)
        kept.append(True)
        if len(pending) == RESIZE_CHUNK:
            flush()
    flush()
    array = np.concatenate(blocks) if blocks else np.zeros((0, size, size), np.int16)
    return number, array, kept, skips, warnings
