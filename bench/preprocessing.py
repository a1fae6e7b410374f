"""Benchmark: slices/s of preprocess.py against a naive reference and against the floor.

    python -m bench.preprocessing [--slices 2000] [--workers 2]

(a) naive: the original study's way, one file at a time in one process: read, HU, save one compressed file per
    slice; then a second pass that loads each file and resizes it.
(b) floor: dcmread + pixel_array of every CT file and nothing else, with the same number of workers.
Target: >= 3x the naive reference with 2 workers, and within 1.5x of the floor.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pydicom
import torch

import preprocess
from latentct.data import phantom
from latentct.data.dicom import list_files, resize_slices
from latentct.util.settings import load_settings, parse_settings, setting


@dataclass
class Settings:
    """Preprocessing throughput against a naive reference and the DICOM-reading floor."""

    slices: int = setting(2000, "slices in the benchmark tree (at least 2,000 for the issue's figure)")
    size: int = setting(512, "matrix size of the benchmark tree")
    out_size: int = setting(128, "preprocessed size")
    workers: int = setting(2, "processes for preprocess.py and the floor")
    tree: str = setting("data/bench_tree", "where the benchmark tree is cached between runs")


def naive(tree: Path, work: Path, size: int) -> int:
    """One file at a time, as the original study did: save compressed per slice, then resize in a second pass."""
    stage1 = work / "hu"
    stage1.mkdir()
    count = 0
    for path in list_files(tree):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if ds.get("Modality") != "CT":
            continue
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.savez_compressed(stage1 / f"{count:06d}.npz", hu=np.clip(hu, -1024, 3071))
        count += 1
    resized = [resize_slices(np.load(f)["hu"][None], size)[0] for f in sorted(stage1.glob("*.npz"))]
    np.save(work / "slices.npy", np.stack(resized))
    return count


def _floor_one(path: str) -> int:
    return int(pydicom.dcmread(path).pixel_array.shape[0] > 0)


def floor(files: list[str], workers: int) -> int:
    with get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_floor_one, files, chunksize=32))


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(cfg: Settings) -> dict:
    torch.set_num_threads(1)
    tree = Path(cfg.tree)
    patients = max(1, cfg.slices // 100)
    wanted = phantom.Settings(output=str(tree), patients=patients, slices=-(-cfg.slices // patients), size=cfg.size,
                              repeat_scans=0, workers=cfg.workers, overwrite=True)
    saved = tree / "config.json"
    if not saved.is_file() or load_settings(phantom.Settings, saved) != wanted:
        print(f"writing the benchmark tree ({patients} patients, {wanted.slices} slices, {cfg.size}px) to {tree}")
        phantom.write_phantom(wanted)
    ct_files = [str(p) for p in tree.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"]
    n = len(ct_files)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_ours, _ = timed(preprocess.main, preprocess.Settings(input=str(tree), output=str(tmp / "ours"),
                                                              size=cfg.out_size, workers=cfg.workers))
        (tmp / "naive").mkdir()
        t_naive, counted = timed(naive, tree, tmp / "naive", cfg.out_size)
        t_floor, _ = timed(floor, ct_files, cfg.workers)
        assert counted == n
        shutil.rmtree(tmp / "naive")
    result = {"slices": n, "ours_slices_per_s": n / t_ours, "naive_slices_per_s": n / t_naive,
              "floor_slices_per_s": n / t_floor, "speedup_vs_naive": t_naive / t_ours, "ratio_to_floor": t_ours / t_floor}
    print(f"\npreprocess benchmark: {n} slices of {cfg.size}px -> {cfg.out_size}px, {cfg.workers} workers")
    print(f"  preprocess.py   {result['ours_slices_per_s']:8.1f} slices/s")
    print(f"  naive reference {result['naive_slices_per_s']:8.1f} slices/s  (1 process)")
    print(f"  floor           {result['floor_slices_per_s']:8.1f} slices/s  (dcmread + pixel_array only)")
    print(f"  speed-up vs naive: {result['speedup_vs_naive']:.2f}x (target >= 3x)")
    print(f"  time vs floor:     {result['ratio_to_floor']:.2f}x (target <= 1.5x)")
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(parse_settings(Settings)), default=float))
