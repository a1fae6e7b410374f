"""Which way to unmix a span, by measurement, on a finished pipeline run's generators: the span of an orthogonal
base (the run's unmix base; SeFa on the DCGAN and the spectral method on the VAE where the run unmixes the whole
latent) unmixed by joint diagonalisation, by FastICA of three kinds of label-free features and by the steering
walks (independent, or conditioned on each other with two or four content directions), the whole latent unmixed by
the conditional walks (two, four or eight content directions), GANSpace's ICA and sparse PCA, the study's
deformator started from the unmixed basis, and the metadata method's parts (where the generator has an encoder),
each scored by the run's own ground truth (its oracle, floors, latents and pooled null) beside the base.

    python -m bench.unmixing --run demo

Prints one row per (generator, variant) and writes Animations/<run>/unmixing.json. Every row is one draw of
report latents (a benchmark run's other draws are not merged in). Joint diagonalisation and ICA unmix the base's
top 8, so their span ceiling is the base's at k = 8; the steering walks take up to 6 + content directions inside
the base's top 12 or the whole latent, and their ceiling is their own span's; the base row itself is judged at
k = recoverable.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import EvalDirections
from latentct.util.io import atomic_write_json
from latentct.util.settings import parse_settings, setting
from pipeline import metadata_set
from Training import TrainDirections

# The orthogonal method whose top directions span the unmixed variants where the run unmixes the whole latent.
SPAN_BASE = {"dcgan": "sefa", "vae": "spectral"}


@dataclass
class Settings:
    """Unmixing variants on a finished run's generators, scored by its ground truth."""

    run: str = setting("demo", "the pipeline run whose generators, bases and ground truth to use")
    root: str = setting(".", "folder under which runs/ and Animations/ live")
    generators: list[str] = setting(["dcgan", "vae"], "generators of the run")


def variants(base: Path, has_encoder: bool, metadata_set: Path | None = None) -> dict[str, dict]:
    """Name -> TrainDirections settings of every variant (the base's span, m = 8, unless said: the steering walks
    fit six edits and two content directions, unless said, in the top 12 or the whole latent). With an encoder,
    the metadata method's parts apart: on the generator's own training slices (32 patients), and on the run's
    metadata set its patient-level subspace cut by FastICA (the method before --metadata-unmix conditional), read
    back into the latent or not (the pipeline's row reads back and cuts by the steering walks)."""
    span = dict(method="unmix", unmix_from=str(base / "directions.pt"))
    whole = dict(method="unmix", unmix_from="latent", unmix_by="conditional")
    out = {"unmix ajd": dict(span, unmix_by="ajd"),
           "unmix steer": dict(span, unmix_by="steer", unmix_size=12),
           "unmix conditional": dict(span, unmix_by="conditional", unmix_size=12),
           "unmix conditional, 4 content": dict(span, unmix_by="conditional", unmix_size=12, unmix_content=4),
           "whole latent, conditional": dict(whole),
           "whole latent, conditional, 4 content": dict(whole, unmix_content=4),
           "whole latent, conditional, 8 content": dict(whole, unmix_content=8),
           "unmix ica layer": dict(span, unmix_by="ica", unmix_features="layer"),
           "unmix ica image": dict(span, unmix_by="ica", unmix_features="image"),
           "ganspace ica": dict(method="ica", directions_count=16),
           "ganspace spca": dict(method="spca", directions_count=16)}
    if has_encoder:
        out["unmix ica encoder"] = dict(span, unmix_by="ica", unmix_features="encoder")
        out["metadata, training slices"] = dict(method="metadata")
        if metadata_set is not None:  # FastICA's cut as before (5 sources), read back and in the codes' space
            ica = dict(method="metadata", metadata_data=str(metadata_set), metadata_unmix="ica", patient_directions=5)
            out["metadata, FastICA"] = ica
            out["metadata, FastICA, codes' space"] = dict(ica, metadata_read_back=False)
    return out


def make(out: Path, settings: dict) -> tuple[Path, float]:
    """One variant's directions (kept from an earlier run of this benchmark) and the seconds they took."""
    timing = out / "seconds.json"
    if not (out / "directions.pt").is_file() or not timing.is_file():
        began = time.time()
        TrainDirections.main(replace(TrainDirections.Settings(), **dict(settings, output=str(out))))
        atomic_write_json(timing, {"seconds": round(time.time() - began, 1)})
    return out, json.loads(timing.read_text())["seconds"]


def main(cfg: Settings) -> list[dict]:
    from latentct.generators.interface import load_encoder

    root = Path(cfg.root)
    runs, anim = root / "runs" / cfg.run, root / "Animations" / cfg.run
    settings = json.loads((anim / "summary.json").read_text())["settings"]
    rows = []
    for gen in cfg.generators:
        generator = runs / gen / "generator.pt"
        base_method = settings[f"{gen}_unmix_base"]
        base_method = SPAN_BASE[gen] if base_method == "latent" else base_method
        base = runs / f"{gen}_{base_method}"
        work = runs / "unmixing"
        shared = dict(generator=str(generator), seed=settings["seed"], device="cpu", rca=False, steps=1)
        own_set = metadata_set(root / "data" / cfg.run, settings["image_size"])
        if not (base / "directions.pt").is_file():  # a run that unmixed the whole latent without this method
            base = make(work / f"{gen}_{base_method}", dict(shared, method=base_method))[0]
        found = variants(base, load_encoder(generator) is not None,
                         own_set if (own_set / "manifest.json").is_file() else None)
        made = {name: make(work / f"{gen}_{''.join(c if c.isalnum() else '_' for c in name)}", dict(shared, **extra))
                for name, extra in found.items()}
        # the study's deformator from the unmixed (ajd) basis, trained like the run's learned directions
        preset = dict(TrainDirections.PRESETS[settings["direction_presets"][0]], steps=settings["direction_steps"],
                      batch_size=settings["direction_batch"])
        made["learned from unmix ajd"] = make(work / f"{gen}_learned_from_unmix", dict(
            preset, generator=str(generator), seed=settings["seed"], device="cpu",
            init_directions=str(made["unmix ajd"][0] / "directions.pt")))

        gallery = anim / gen
        config = json.loads((gallery / "ground_truth" / "config.json").read_text())
        supervised = [c for c in config["compare"] if Path(c).parent.name == f"{gen}_supervised"]
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(gallery / "report.json", Path(tmp) / "report.json")
            truth = replace(EvalDirections.Settings(), **dict(
                config, output=tmp, ground_truth="only", null_cache=str(work / f"{gen}_null.pt"), seed_runs=[],
                compare=[str(base / "directions.pt")] + [str(out / "directions.pt") for out, _ in made.values()]
                + supervised))
            gt = EvalDirections.main(truth)["ground_truth"]
        names = ["learned (the run's)", f"{base_method} (base)", *made]
        for name, (method, table) in zip(names, gt["methods"].items()):
            if method == "supervised":
                continue
            sub = table.get("subspace") or {}
            info = {}
            if name in made:
                from latentct.discover.directions import load_directions

                extra = load_directions(made[name][0] / "directions.pt")[0].extra
                info = {k: extra[k] for k in ("linearity", "off_diagonal", "iterations", "converged", "reproduced")
                        if k in extra}
            rows.append({"generator": gen, "variant": name, "recovered_at": table["recovered_at"],
                         "recoverable_at": gt["recoverable_at"], "auc": table["auc"],
                         "p": (table["p_value"] or {}).get("auc"), "verdict": table["verdict"],
                         "span_ceiling_at": sub.get("span_ceiling_at"), "k": sub.get("k"),
                         "angles_deg": sub.get("angles_deg"), "seconds": round(made[name][1], 1) if name in made
                         else None, **info})
            r = rows[-1]
            at = r["recovered_at"]
            print(f"{gen:6s} {name:24s} recovered {at['0.5']}/{at['0.67']}/{at['0.8']} of "
                  f"{gt['recoverable_at']['0.67']} at 2/3, area {r['auc'] if r['auc'] is None else round(r['auc'], 2)}"
                  f", p {r['p']}, ceiling {r['span_ceiling_at']}, {info}")
    atomic_write_json(anim / "unmixing.json", {"rows": rows})
    return rows


if __name__ == "__main__":
    main(parse_settings(Settings, sys.argv[1:]))
