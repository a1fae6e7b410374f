"""Stage 1: a DICOM tree (LIDC-IDRI as TCIA delivers it, or the phantom) to int16 HU slice arrays.

    python preprocess.py --input data/phantom --output data/phantom_128 --size 128

Writes train.npy / test.npy (N, 1, S, S) int16 HU, train_index.csv / test_index.csv (one row per array row),
manifest.json (settings, counts, versions, every skipped file with its reason), preprocess.log and config.json.
The split is by PatientID. The output folder appears only when complete (staging folder, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch

from latentct.data.dicom import Skip, SliceHeader, group_series, list_files, read_header, read_series
from latentct.util.io import NpyAppender, atomic_write_json, atomic_write_text, replace_dir, staging_dir
from latentct.util.parallel import pool_map, worker_pool
from latentct.util.settings import UserError, check, run_cli, save_settings, setting, settings_dict

INDEX_COLUMNS = ["patient_id", "study_uid", "series_uid", "sop_uid", "z_mm", "slice_index", "z_rel",
                 "pixel_spacing_mm", "source_file"]


@dataclass
class Settings:
    """Convert a DICOM tree of chest CT into train/test arrays of axial slices, split by patient."""

    input: str = setting("data/phantom", "DICOM tree to read (every file under it is considered)")
    output: str = setting("data/phantom_128", "output folder for the arrays, indexes and manifest")
    size: int = setting(128, "side of the stored slices in pixels")
    test_fraction: float = setting(0.2, "share of patients in the test split (ignored with patient lists)")
    seed: int = setting(0, "seed of the patient split")
    workers: int = setting(2, "processes reading series in parallel")
    train_patients: str | None = setting(None, "file listing the PatientIDs of the train split, one per line")
    test_patients: str | None = setting(None, "file listing the PatientIDs of the test split, one per line")
    labels: str | None = setting(None, "CSV keyed by sop_uid whose columns join the index "
                                       "(default: phantom_factors.csv at the input root, when present)")
    overwrite: bool = setting(False, "replace an existing output folder")

    def __post_init__(self):
        check(8 <= self.size <= 1024, "size", f"must be between 8 and 1024, got {self.size}")
        check(0.0 <= self.test_fraction < 1.0, "test_fraction", f"must be in [0, 1), got {self.test_fraction}")
        check(self.workers >= 1, "workers", f"must be at least 1, got {self.workers}")
        check((self.train_patients is None) == (self.test_patients is None), "train_patients",
              "give both --train-patients and --test-patients, or neither")


# ------------------------------------------------------------------------------------------------ helpers

def _read_patient_list(path: str, name: str) -> set[str]:
    if not Path(path).is_file():
        raise UserError(f"--{name}: {path} is not a file")
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}


def split_patients(patients: list[str], cfg: Settings) -> dict[str, str]:
    """PatientID -> 'train' or 'test'. Seeded random split, or the user's lists."""
    if cfg.train_patients is not None:
        train = _read_patient_list(cfg.train_patients, "train-patients")
        test = _read_patient_list(cfg.test_patients, "test-patients")
        both = sorted(train & test)
        if both:
            raise UserError(f"--train-patients and --test-patients both list {', '.join(both[:5])}")
        return {p: ("train" if p in train else "test") for p in patients if p in train or p in test}
    order = sorted(patients)
    rng = np.random.default_rng(cfg.seed)
    rng.shuffle(order)
    n_test = int(round(cfg.test_fraction * len(order)))
    if cfg.test_fraction > 0 and len(order) >= 2:
        n_test = min(max(n_test, 1), len(order) - 1)
    return {p: ("test" if i < n_test else "train") for i, p in enumerate(order)}


def _load_labels(cfg: Settings, root: Path) -> tuple[list[str], dict[str, dict]]:
    path = Path(cfg.labels) if cfg.labels else root / "phantom_factors.csv"
    if not path.is_file():
        if cfg.labels:
            raise UserError(f"--labels: {path} is not a file")
        return [], {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "sop_uid" not in reader.fieldnames:
            raise UserError(f"{path}: labels CSV needs a sop_uid column")
        columns = [c for c in reader.fieldnames if c not in INDEX_COLUMNS]
        return columns, {row["sop_uid"]: row for row in reader}


def _versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "pydicom": pydicom.__version__}


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ main

def main(cfg: Settings) -> Path:
    root, final = Path(cfg.input), Path(cfg.output)
    if not root.exists():
        raise UserError(f"--input: {root} does not exist")
    if final.exists() and not cfg.overwrite:
        raise UserError(f"--output: {final} exists; pass --overwrite to replace it")
    started = time.time()
    with worker_pool(cfg.workers) as pool:
        files, series, skipped = discover(root, pool)
        label_columns, labels = _load_labels(cfg, root)
        split = split_patients(sorted({s.key[0] for s in series}), cfg)
        for s in series:
            if s.key[0] not in split:
                skipped += [Skip(h.path, f"patient {s.key[0]} is in neither patient list") for h in s.slices]
        series = [s for s in series if s.key[0] in split]
        staging = staging_dir(final)
        try:
            result = convert(series, split, root, staging, cfg.size, labels, pool)
            for name in ("train", "test"):
                atomic_write_text(staging / f"{name}_index.csv", _csv_text(result["index"][name],
                                                                           INDEX_COLUMNS + label_columns))
            manifest = _manifest(cfg, root, files, split, skipped + result["skipped"], result, label_columns)
            manifest["seconds"] = round(time.time() - started, 2)
            atomic_write_json(staging / "manifest.json", manifest)
            atomic_write_text(staging / "preprocess.log", "".join(
                [f"skipped {s['file']}: {s['reason']}\n" for s in manifest["skipped"]] +
                [f"warning {w['file']}: {w['warning']}\n" for w in manifest["warnings"]]))
            save_settings(cfg, staging / "config.json")
            replace_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _print_summary(manifest, final)
    return final


def discover(root: Path, pool) -> tuple[list[str], list, list[Skip]]:
    """Pass 1, headers only: every file classified, CT slices grouped into sorted series."""
    files = list_files(root) if root.is_dir() else [str(root)]
    headers, skipped = [], []
    for result in pool_map(read_header, files, pool, "headers", "file", chunksize=64):
        (skipped if isinstance(result, Skip) else headers).append(result)
    series, duplicates = group_series(headers)
    if not series:
        raise UserError(f"--input: no axial CT slices found under {root} ({len(files)} files looked at, "
                        f"{len(skipped)} skipped)")
    return files, series, skipped + duplicates


def convert(series: list, split: dict, root: Path, staging: Path, size: int, labels: dict, pool) -> dict:
    """Pass 2, pixels: series by series in the workers, streamed into train.npy / test.npy."""
    writers = {name: NpyAppender(staging / f"{name}.npy", (1, size, size)) for name in ("train", "test")}
    out = {"index": {"train": [], "test": []}, "skipped": [], "warnings": [], "series": []}
    jobs = [(i, [h.path for h in s.slices], size) for i, s in enumerate(series)]
    with writers["train"], writers["test"]:
        for number, array, kept, skips, notes in pool_map(read_series, jobs, pool, "series", "series"):
            s = series[number]
            name = split[s.key[0]]
            writers[name].append(array[:, None])
            out["skipped"] += skips
            out["warnings"] += notes
            good = [h for h, ok in zip(s.slices, kept) if ok]
            out["index"][name] += _index_rows(good, root, size, labels)
            out["series"].append({"patient_id": s.key[0], "study_uid": s.key[1], "series_uid": s.key[2],
                                  "split": name, "slices": len(good), "gaps": s.gaps})
    out["counts"] = {name: w.count for name, w in writers.items()}
    return out


def _manifest(cfg, root, files, split, skipped, result, label_columns) -> dict:
    rel = lambda f: os.path.relpath(f, root) if root.is_dir() else f  # noqa: E731
    skip_list = [{"file": rel(s.file), "reason": s.reason} for s in skipped]
    return {
        "settings": settings_dict(cfg), "input": str(root.resolve()), "versions": _versions(),
        "array": {"dtype": "int16", "unit": "HU", "item_shape": [1, cfg.size, cfg.size], "clip": [-1024, 3071]},
        "counts": {"files": len(files), "series": len(result["series"]),
                   "patients": {n: sum(1 for v in split.values() if v == n) for n in ("train", "test")},
                   "slices": result["counts"], "skipped": len(skip_list)},
        "label_columns": label_columns, "skipped": skip_list,
        "warnings": [{"file": rel(f), "warning": w} for f, w in result["warnings"]],
        "series": result["series"],
    }


def _index_rows(good: list[SliceHeader], root: Path, size: int, labels: dict[str, dict]) -> list[dict]:
    rows = []
    top, bottom = (good[0].position, good[-1].position) if good else (0.0, 0.0)
    extent = (top - bottom) or 1.0
    for i, h in enumerate(good):
        row = {"patient_id": h.patient_id, "study_uid": h.study_uid, "series_uid": h.series_uid, "sop_uid": h.sop_uid,
               "z_mm": round(h.z_mm, 4), "slice_index": i, "z_rel": round((top - h.position) / extent, 6),
               "pixel_spacing_mm": round(h.pixel_spacing * h.rows / size, 6),
               "source_file": os.path.relpath(h.path, root) if root.is_dir() else h.path}
        extra = labels.get(h.sop_uid, {})
        rows.append({**{k: v for k, v in extra.items() if k not in row}, **row})
    return rows


def _print_summary(manifest: dict, final: Path) -> None:
    counts = manifest["counts"]
    reasons: dict[str, int] = {}
    for s in manifest["skipped"]:
        key = s["reason"].split(":")[0].split(" in series")[0].split(" (kept")[0]
        reasons[key] = reasons.get(key, 0) + 1
    print(f"preprocess: {counts['slices']['train']} train / {counts['slices']['test']} test slices from "
          f"{counts['patients']['train']} / {counts['patients']['test']} patients ({counts['series']} series) -> {final}")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  skipped {n} file(s): {reason}", file=sys.stderr)
    if manifest["warnings"]:
        print(f"  {len(manifest['warnings'])} warning(s); see {final / 'preprocess.log'}", file=sys.stderr)


def summary_line(output: Path) -> str:
    """The pipeline's one line for this stage."""
    counts = json.loads((Path(output) / "manifest.json").read_text())["counts"]["slices"]
    return f"{counts['train']} train / {counts['test']} test slices"


if __name__ == "__main__":
    run_cli(main, Settings)
