import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from latentct.discover.directions import load_directions
from latentct.generators.interface import file_hash, load_encoder, load_generator
from latentct.util.settings import UserError, code_version, parse_settings


def test_whole_pipeline_at_the_smallest_sizes_then_cached_then_from_a_stage(tmp_path):
    cfg = parse_settings(pipeline.Settings, ["--preset", "tiny", "--root", str(tmp_path), "--run", "t",
                                             "--device", "cpu", "--workers", "1"], presets=pipeline.PRESETS)
    summary = pipeline.main(cfg)
    stages = [r["stage"] for r in summary["stages"]]
    # the first gallery's jobs come first, alone; the rest ran two at a time in worker processes
    assert stages[:5] == ["phantom", "preprocess", "train_gan", "directions", "evaluate"]
    assert [r["name"] for r in summary["stages"]][3:5] == ["dcgan_demo", "eval_dcgan"]
    assert summary["first_gallery_seconds"] == summary["stages"][4]["finished_at"] <= summary["wall_seconds"]
    assert stages.count("evaluate") == 4 and stages.count("train_diffusion") == 1
    assert stages.count("ground_truth") == 4 and stages.count("oracle") == 2 and not summary["pending"]
    # DCGAN: learned, 7 closed-form methods, the unmixed latent and the learned run started from it, DisCo and
    # LatentCLR each trained then RCA-measured, supervised; VAE: learned, SeFa, random, metadata, the unmixed latent
    # (no base to run), supervised; diffusion, noise view: spectral, random, unmix, supervised; h view: hpca,
    # spectral, random, unmix, supervised
    assert stages.count("phantom") == stages.count("preprocess") == 2  # the metadata method's own set too
    assert stages.count("validate") == 1 and stages.count("directions") == 15 + 6 + 4 + 5
    # each stage says in one line how it went, read from its own files
    metric = {r["name"]: r["metric"] for r in summary["stages"]}
    assert all(metric.values()), [name for name, m in metric.items() if not m]
    assert metric["phantom"].endswith(" slices of 6 patients") and metric["preprocess"].endswith("test slices")
    assert metric["dcgan"].startswith("SWD ") and metric["dcgan_demo"].startswith("RCA 0.")
    assert metric["dcgan_supervised"] == "RCA not measured" and "strong (a measurement with R2" in metric["eval_dcgan"]
    assert re.fullmatch(r"\d+(\.5)? recovered of \d+(\.5)? recoverable at tau 2/3, area (–|\d\.\d\d) \(p \d\.\d{3}\): "
                        r"(not )?above null(, borderline)?", metric["truth_dcgan"]), metric["truth_dcgan"]
    assert metric["oracle"].startswith("held-out R2")
    assert metric["validate"].startswith(("0/6", "1/6", "2/6", "3/6", "4/6", "5/6", "6/6"))
    data, runs, anim = tmp_path / "data" / "t", tmp_path / "runs" / "t", tmp_path / "Animations" / "t"

    # every artifact exists and loads
    assert (data / "phantom" / "phantom_factors.csv").is_file()
    assert np.load(data / "slices_32" / "train.npy", mmap_mode="r").shape[1:] == (1, 32, 32)
    scored = {"dcgan": ("sefa", "pca", "random", "coordinate", "spectral", "ica", "spca", "unmix", "learned_unmix",
                        "disco", "latentclr"),
              "vae": ("sefa", "random", "metadata", "unmix")}
    # the metadata method encodes its own set (a few slices of each of other patients), read back into the latent
    meta = json.loads((data / "metadata_slices_32" / "manifest.json").read_text())["counts"]
    assert meta["slices"] == {"train": 12 * 4, "test": 0}
    found = load_directions(runs / "vae_metadata" / "directions.pt")[0].extra
    assert found["patients"] == 12 and found["slices"] == 48 and found["fitted_in"] == "latent"
    # and cut by the conditional steering walks inside its span, the slice direction first as measured
    assert found["steered"]["unmix_by"] == "conditional" and found["steered"]["rows"][0] == "given"
    # each generator's whole latent unmixed (pipeline's --dcgan-unmix-base, --vae-unmix-base), by the conditional
    # walks with --unmix-content 8
    unmixed = {gen: load_directions(runs / f"{gen}_unmix" / "directions.pt")[0] for gen in ("dcgan", "vae")}
    assert all(u.extra["unmix_by"] == "conditional" and u.extra["m"] == 32 and u.count <= 14 and
               u.extra["unmixed"] == "latent" and u.state["settings"]["unmix_content"] == 8 for u in unmixed.values())
    for gen in ("dcgan", "vae"):
        G = load_generator(runs / gen / "generator.pt")
        assert G(torch.zeros(2, G.latent_dim)).shape == (2, 1, 32, 32)
        for method in ("demo", *scored[gen]):
            folder = f"{gen}_{method}_rca" if method in pipeline.TRAINED else f"{gen}_{method}"
            directions, _ = load_directions(runs / folder / "directions.pt")
            assert directions.method == ("learned" if method == "demo" else method) and directions.rca is not None
        report = json.loads((anim / gen / "report.json").read_text())
        assert len(report["directions"]) == 16 and (anim / gen / "index.html").is_file()
        gt = report["ground_truth"]
        assert set(gt["methods"]) == {"learned", *scored[gen], "supervised"}
        assert report["distinct_effects"] == len(report["axes"]) >= 1
        assert gt["recoverable"] == gt["methods"]["supervised"]["recovered"] and gt["null"]["sets"] == 50
        assert gt["recoverable_at"] == gt["methods"]["supervised"]["recovered_at"] and gt["null"]["pool"] == 64
        assert gt["validation"]["checks"] and set(gt["attainable"]["vae"]) == set(gt["noise_floor"])
        assert gt["methods"]["supervised"]["supervision"] == "labels"
        assert all(t["supervision"] == ("metadata" if m == "metadata" else "labels"
                                        if m == "supervised" else "none") for m, t in gt["methods"].items())
        assert gt["oracles"]["fit"] == gt["methods"]["supervised"]["supervised"]["oracle_sha256"]
        assert all("effect_dci" in t and t["recoverable"] == gt["recoverable"] for t in gt["methods"].values())
        assert all(t["recovered"] == t["recovered_at"]["0.67"] and t["verdict"] for t in gt["methods"].values())
        assert (anim / gen / report["ground_truth"]["heatmap"]).is_file()
        # the subspace diagnostic: every label-free method's span against the supervised one, with its ceiling
        for method, t in gt["methods"].items():
            sub = t.get("subspace")
            assert (sub is None) == (method == "supervised")
            if sub is not None:
                k = t["directions_count"] if method not in ("sefa", "pca", "spectral") else \
                    min(t["directions_count"], gt["recoverable_at"]["0.67"])
                assert sub["k"] == k and len(sub["angles_deg"]) == min(sub["rank"], 6)
                assert set(sub["share_in_span"]) == set(gt["noise_floor"])
                if k:
                    assert 0 < sub["chance"] <= 1 and set(sub["span_ceiling_at"]) == {"0.5", "0.67", "0.8"}
                    assert set(sub["span_ceiling_chance_at"]) == {"0.5", "0.67", "0.8"}
                    image = sub["image"]   # the same measured on the image changes, 3 latents at tiny size
                    assert image["latents"] == 3 and set(image["share_in_span"]) == set(image["chance"]) == set(
                        gt["noise_floor"]) and all(0 <= v <= 1 + 1e-6 for v in image["share_in_span"].values())
                else:
                    assert sub["span_ceiling_at"] is None and sub["angles_deg"] == [] and sub["image"] is None
        assert "Ground truth on the phantom" in (anim / gen / "index.html").read_text()
        assert len(list((anim / gen).glob("direction_*.gif"))) == 16
    # the diffusion model: one training, two views scored like generators of their own
    assert metric["diffusion"].startswith("SWD ") and (runs / "diffusion" / "samples_latest.png").is_file()
    for view, methods in (("noise", ("spectral", "random", "unmix")), ("h", ("hpca", "spectral", "random", "unmix"))):
        report = json.loads((anim / f"diffusion_{view}" / "report.json").read_text())
        assert report["diffusion"] == {"view": view, "ddim_steps": 3, "t_edit": 500}
        assert report["method"] == methods[0] and len(report["directions"]) == 3
        scored = report["ground_truth"]
        assert set(scored["methods"]) == {*methods, "supervised"} and scored["null"]["pool"] == 64
        for method in (*methods, "supervised"):
            directions, G = load_directions(runs / f"diffusion_{view}_{method}" / "directions.pt")
            assert G.view == view and directions.state["diffusion"]["view"] == view
            if view == "h":  # every direction moves dh only
                assert directions.matrix[:, :G.x_dim].abs().max() < 1e-9
    # the dataset's label columns (the phantom's factors) against every method's span, from VAE-encoded slices
    labels = json.loads((anim / "vae" / "report.json").read_text())["label_subspace"]
    assert labels["columns"] == list(gt["noise_floor"]) and labels["encoder"] == "encoder"
    assert set(labels["methods"]) == {"learned", "sefa", "random", "metadata", "unmix"}
    assert len(labels["supervised_angles_deg"]) == 6
    assert json.loads((anim / "dcgan" / "report.json").read_text())["label_subspace"] is None  # no encoder
    assert "Against the dataset&#x27;s labels" in (anim / "vae" / "index.html").read_text()
    assert load_encoder(runs / "vae" / "generator.pt") is not None
    assert json.loads((anim / "vae" / "report.json").read_text())["real"][0]["embedding"] == "encoder"
    saved = json.loads((anim / "summary.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == stages and "dcgan/index.html" in (anim / "index.html").read_text()
    assert saved["commit"] == code_version(Path(pipeline.__file__).resolve().parent)  # the code the figures come from
    from latentct.show.results import _ground_truths, machine_record

    os.utime(anim / "summary.json", (0, 0))  # a copied summary's file time says nothing of when the run was
    record = machine_record(saved, _ground_truths(saved), tmp_path)
    assert saved["written"].endswith("Z") and record["date"] == saved["written"][:10]  # when the run ended
    assert record["wall_seconds"] == saved["wall_seconds"] and record["machine"] == saved["machine"]
    made = {gen: json.loads((anim / gen / "report.json").read_text())["generator"] for gen in record["generators"]}
    assert set(made) == {"dcgan", "vae", "diffusion_noise", "diffusion_h"}
    assert record["weights"] == {gen: file_hash(f) for gen, f in made.items()}  # each gallery's own generator
    assert record["weights"]["diffusion_noise"] == record["weights"]["diffusion_h"] != record["weights"]["vae"]

    # the README's short blocks and docs/results.md's tables come from these files, by a command
    from latentct.show import results

    block = results.render(results.Settings(run="t", root=str(tmp_path), examples=1))
    assert "| train_gan | dcgan |" in block and "| learned |" in block and "| dcgan | 6 |" in block
    assert len(list((tmp_path / "Animations" / "examples").glob("*.gif"))) == 4  # one per gallery
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    blocks = {name: results.markers(name) for name in ("examples", "runtime", "results")}
    readme.write_text("intro\n{0}\nSTALE-GIFS\n{1}\n{2}\nSTALE-TIME\n{3}\nmiddle\n{4}\nSTALE-GLANCE\n{5}\nrest\n".format(
        *blocks["examples"], *blocks["runtime"], *blocks["results"]))
    docs.write_text("head\n{}\nSTALE-TABLES\n{}\ntail\n".format(*blocks["results"]))
    results.main(results.Settings(run="t", root=str(tmp_path), examples=1, readme=str(readme), docs=str(docs)))
    text, full = readme.read_text(), docs.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("rest\n")
    assert "STALE" not in text and "STALE" not in full and full.startswith("head\n") and full.endswith("tail\n")
    # README: the GIF row linked from the README's folder, and one at-a-glance row per generator and method
    gifs = sorted(p.name for p in (tmp_path / "Animations" / "examples").glob("*.gif"))
    assert all(f"![](Animations/examples/{name})" in text for name in gifs) and "| train_gan |" not in text
    for gen in ("dcgan", "vae"):
        gt = json.loads((anim / gen / "report.json").read_text())["ground_truth"]
        for method, t in gt["methods"].items():
            p = t["p_value"]["auc"]
            area = "–" if t["auc"] is None else f"{t['auc']:.2f}"
            name = f"{method} (uses patient and slice position)" if method == "metadata" else method
            row = (f"| {gen} | {name} | {t['recovered_at']['0.67']} of {gt['recoverable']} | {area} | {p:.3f} | "
                   f"{t['verdict']} |")
            assert row in text, row
    assert "[docs/results.md](docs/results.md)" in text
    assert f"The main job took {results._minutes(summary['wall_seconds'])} on the machine that last ran it" in text
    # the example GIFs are the cleanest label-free directions of any method the ground truth scored (the random
    # and supervised references aside), captioned with the method and their share of the factor they stand for
    truth = json.loads((anim / "dcgan" / "report.json").read_text())["ground_truth"]["methods"]
    assert all(load_directions(t["file"])[0].method == m.split(" (")[0] and file_hash(t["file"]) == t["file_sha256"]
               for m, t in truth.items())
    free = [(m, d) for m, t in truth.items() if t["supervision"] == "none" and m != "random" for d in t["directions"]]
    method, cleanest = max(free, key=lambda md: ("stands_for" in md[1] or "also_for" in md[1], md[1]["share"]))
    assert f"dcgan {method} k={cleanest['direction']}: " in text and f"{cleanest['share']:.2f}" in text
    assert (f"dcgan_{method}_{cleanest['direction']}.gif" if method != "learned" else
            f"dcgan_{cleanest['direction']}.gif") in gifs
    # another method's directions are swept and measured as the gallery's own: its own file, rendered so, gives
    # the gallery's measurements of that direction
    shown_rows = json.loads((anim / "dcgan" / "report.json").read_text())["directions"]
    again = results.render_others(anim / "dcgan", truth["learned"], [3], tmp_path / "again")
    assert list(again) == [3] and Path(again[3]["gif"]).is_file()
    assert again[3]["slope"].keys() == shown_rows[3]["slope"].keys()
    assert all(np.isclose(again[3]["slope"][m], shown_rows[3]["slope"][m], rtol=1e-3, atol=1e-6)
               for m in again[3]["slope"])
    with pytest.raises(UserError, match="changed since the ground truth scored it"):   # a retrained file is refused
        results.render_others(anim / "dcgan", dict(truth["sefa"], file_sha256="0" * 64), [0], tmp_path / "stale")
    # where another method holds the cleanest direction, its GIF is rendered and captioned with its own share
    import shutil

    staged = tmp_path / "staged" / "Animations" / "t" / "dcgan"
    shutil.copytree(anim / "dcgan", staged)
    report = json.loads((staged / "report.json").read_text())
    for name, t in report["ground_truth"]["methods"].items():
        for d in t["directions"]:
            d.pop("stands_for", None), d.pop("also_for", None)
            d["share"] = 0.999 if (name, d["direction"]) == ("sefa", 2) else min(d["share"], 0.6)
    (staged / "report.json").write_text(json.dumps(report))
    [(file, caption)] = results.examples(staged.parent, [{"output": str(staged)}], 1)
    assert file == "dcgan_sefa_2.gif" and caption.startswith("dcgan sefa k=2: factor: mostly ")
    assert "share 1.00" in caption and (staged.parent.parent / "examples" / file).stat().st_size > 1000
    # docs/results.md: the full tables, the GIFs linked from docs/
    assert "| train_gan | dcgan |" in full and "| dcgan | 6 |" in full and "recovered at 0.5 / 2/3 / 0.8" in full
    oracle_row = next(line for line in full.splitlines() if line.startswith("| width | "))
    kept = json.loads((anim / "validation" / "validation.json").read_text())["oracle"]["width"]["slope_generated"]
    (low, high), (d_low, d_high) = kept["read_interval"], kept["drawn_interval"]   # the kept shares' columns
    assert (f"| {kept['read']:.2f} ({low:.2f}-{high:.2f}) | {kept['drawn']:.2f} ({d_low:.2f}-{d_high:.2f}), width |"
            in oracle_row)
    assert all(f"![](../Animations/examples/{name})" in full for name in gifs)

    # a rerun with the same settings skips every stage, and leaves the summary of the run that made the outputs
    before = (anim / "summary.json").read_bytes()
    again = pipeline.main(cfg)
    assert all(r["cached"] for r in again["stages"]) and (anim / "summary.json").read_bytes() == before

    # --from-stage reruns that stage and everything after it, nothing before
    cfg.from_stage = "evaluate"
    partial = pipeline.main(cfg)
    ran = sorted(r["stage"] for r in partial["stages"] if not r["cached"])
    assert ran == ["evaluate"] * 4 + ["ground_truth"] * 4
    report = json.loads((anim / "dcgan" / "report.json").read_text())
    assert report["ground_truth"]["main"] is not None  # the rerun gallery got its ground truth back
    # the summary keeps the first run's timing, machine and commit: the README's runtime and a record say how the
    # generators were made, and how long the rerun took
    kept = json.loads((anim / "summary.json").read_text())
    assert kept["reused"] == {key: saved[key] for key in ("wall_seconds", "first_gallery_seconds", "commit",
                                                           "machine", "written")}
    assert machine_record(kept, _ground_truths(kept), tmp_path)["wall_seconds"] == saved["wall_seconds"]
    runtime = results.readme_blocks(results.Settings(run="t", root=str(tmp_path), examples=0), None,
                                    "docs/results.md")["runtime"]
    assert f"took {results._minutes(saved['wall_seconds'])} on the machine" in runtime
    assert f"8 of its stages were run again later, in {results._minutes(kept['wall_seconds'])}" in runtime
    full = results.render(results.Settings(run="t", root=str(tmp_path), examples=0))
    assert f"Wall time {results._minutes(saved['wall_seconds'])}" in full and "were run again later" in full


def test_pipeline_flags_beat_the_stage_presets(tmp_path):
    cfg = parse_settings(pipeline.Settings, ["--preset", "paper", "--gan-steps", "2", "--root", str(tmp_path)],
                         presets=pipeline.PRESETS)
    jobs = {job.name: job for job in pipeline.plan(cfg)}
    gan, vae = jobs["dcgan"].cfg, jobs["vae"].cfg
    assert (gan.steps, gan.epochs, gan.ngf) == (2, None, 128)  # typed steps beat the paper preset's 50 epochs
    assert vae.epochs == 50.0 and vae.width == 64  # untouched: the preset decides


def test_pipeline_on_a_generator_a_researcher_brings(gan_run, dataset, tmp_path):
    cfg = parse_settings(pipeline.Settings, [
        "--preset", "tiny", "--root", str(tmp_path), "--run", "own", "--generator", str(gan_run / "generator.pt"),
        "--data", str(dataset), "--methods", "sefa", "random", "--device", "cpu", "--parallel", "1"],
        presets=pipeline.PRESETS)
    summary = pipeline.main(cfg)
    stages = [r["stage"] for r in summary["stages"]]
    assert "phantom" not in stages and "train_gan" not in stages and "train_vae" not in stages
    assert [r["name"] for r in summary["stages"]][:2] == ["model_learned", "eval_model"]
    assert {r["name"] for r in summary["stages"]} >= {"model_sefa", "model_random", "oracle", "validate", "truth_model"}
    report = json.loads((tmp_path / "Animations" / "own" / "model" / "report.json").read_text())
    assert set(report["ground_truth"]["methods"]) == {"learned", "sefa", "random"}
    # unmix on a researcher's generator: its whole latent, cut by the conditional walks
    cfg.methods = ["unmix"]
    job = next(j for j in pipeline.plan(cfg) if j.name == "model_unmix")
    assert job.cfg.unmix_from == "latent" and job.cfg.unmix_by == "conditional" and job.cfg.unmix_content == 8


SMALL_LATENT = """
import torch
import torch.nn as nn


class Small(nn.Module):
    latent_shape = (10,)

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(10, 32 * 32)

    def forward(self, z):
        return torch.tanh(self.map(z)).reshape(-1, 1, 32, 32)
"""


def test_unmix_on_a_small_latent_says_how_many_content_rows_fit_before_any_work(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_LATENT)

    def planned(*flags):
        cfg = parse_settings(pipeline.Settings, ["--root", str(tmp_path), "--generator", f"{tmp_path}/small.py:Small",
                                                 "--methods", "unmix", *flags], presets=pipeline.PRESETS)
        return {j.name: j for j in pipeline.plan(cfg)}

    with pytest.raises(UserError, match="--unmix-content: 8 content rows and six walks do not fit the generator's "
                                        "latent of 10: pass --unmix-content 4 or fewer"):
        planned()  # the default of eight rows needs 14 axes
    assert not (tmp_path / "runs").exists()
    assert planned("--unmix-content", "4")["model_unmix"].cfg.unmix_content == 4


def test_wall_times_round_to_whole_seconds_before_the_minutes():
    from latentct.show import results

    assert [results._minutes(s) for s in (239.5, 885.6, 59.4)] == ["4 min 0 s", "14 min 46 s", "0 min 59 s"]


def test_benchmark_block_from_its_files(tmp_path):
    from latentct.show import results

    anim = tmp_path / "Animations" / "b"
    (anim / "dcgan_disentanglement").mkdir(parents=True)
    gallery = anim / "dcgan"
    gallery.mkdir()

    def table(recovered, auc, p_auc, verdict, supervision="none"):
        found = [{"direction": 3, "factor": "width", "share": 0.91, "effect": 1.2, "r2": 0.9, "also": []}][:recovered]
        return {"matches": {"0.5": found, "0.67": found, "0.8": found}, "supervision": supervision,
                "recovered_at": {"0.5": recovered + 1, "0.67": recovered, "0.8": recovered}, "recovered": recovered,
                "recoverable": 2, "auc": auc, "p_value": {"0.5": 0.2, "0.67": 0.04, "0.8": 0.1, "auc": p_auc},
                "verdict": verdict, "above_null": p_auc < 0.05, "rca": 0.5,
                "effect_dci": {"disentanglement": 0.6, "completeness": 0.5}}

    # sefa and pca tie at 1 at tau 2/3, sefa's area is larger; random recovers more but is the null's kind
    methods = {"sefa": table(1, 0.55, 0.012, "above null, borderline"), "pca": table(1, 0.30, 0.4, "not above null"),
               "random": table(2, 0.7, 0.5, "not above null"),
               "supervised": table(2, 1.0, 0.001, "above null", supervision="labels")}
    gt = {"oracle_r2": {"z_position": 0.95, "width": 0.99}, "methods": methods, "recoverable": 2,
          "null": {"pool": 256, "sets": 1000, "samples": 16, "shifts": 9, "latents": "the report's own"}}
    (gallery / "report.json").write_text(json.dumps({"ground_truth": gt}))
    (anim / "summary.json").write_text(json.dumps({"wall_seconds": 1800, "stages": [
        {"stage": "train_gan", "name": "dcgan", "output": str(tmp_path / "runs" / "b" / "dcgan")},
        {"stage": "evaluate", "name": "eval_dcgan", "output": str(gallery)}]}))
    (anim / "dcgan_disentanglement" / "disentanglement.json").write_text(json.dumps({"methods": [
        {"method": "sefa", "encoder_r2": 0.9, "mig": 0.21, "dci_disentanglement": 0.3, "dci_completeness": 0.25,
         "dci_informativeness": 0.7}]}))
    (anim / "budget.json").write_text(json.dumps([{"generator": "dcgan", "method": "learned", "steps": 300,
                                                   "rca": 0.6, "recovered": 1, "recoverable": 2,
                                                   "effect_disentanglement": 0.4}]))
    (anim / "budget.png").write_bytes(b"png")
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    begin, end = results.markers("benchmark")
    readme.write_text(f"intro\n{begin}\nSTALE\n{end}\nrest\n")
    docs.write_text("{}\nold demo\n{}\n{begin}\nSTALE\n{end}\n".format(*results.markers("results"), begin=begin, end=end))
    results.main(results.Settings(run="b", root=str(tmp_path), block="benchmark", readme=str(readme), docs=str(docs)))
    text, short = docs.read_text(), readme.read_text()
    assert (tmp_path / "Animations" / "examples" / "budget.png").read_bytes() == b"png"
    # docs/results.md: the full tables in the benchmark block, the demo block untouched
    assert "old demo" in text and "STALE" not in text and "![budget curves](../Animations/examples/budget.png)" in text
    assert "| dcgan | sefa | 0.90 | 0.210 | 0.300 | 0.250 | 0.700 | 0.283 (SeFa) |" in text
    assert "| sefa | 0.50 | 2 / 1 / 1 | 1 of 2 | 0.55 | 0.012 | above null, borderline | 0.60 | – | k=3 (0.91) |" in text
    assert "| pca | 0.50 | 2 / 1 / 1 | 1 of 2 | 0.30 | 0.400 | not above null | 0.60 | – | k=3 (0.91) |" in text
    assert "| dcgan | learned | 300 | 0.60 | 1 of 2 | 0.40 |" in text and "30 min 0 s" in text
    # README: at a glance and the first method to try, nothing more
    assert short.startswith(f"intro\n{begin}\n") and short.endswith(f"{end}\nrest\n") and "STALE" not in short
    assert "| dcgan | sefa | 1 of 2 | 0.55 | 0.012 | above null, borderline |" in short
    assert "| dcgan | supervised | 2 of 2 | 1.00 | 0.001 | above null |" in short and "MIG" not in short
    assert ("On the dcgan, the label-free method with the most factors recovered at tau 2/3 is sefa (closed form: "
            "1 of 2 recoverable, area 0.55, p 0.012, above null, borderline). The supervised directions (labels) recover 2.") in short


def test_one_ordering_table_places_every_job(tmp_path):
    """The main lane (phantom, preprocessing, then per generator its training, learned directions and the first
    gallery) comes first; the pool follows in ORDER; --from-stage counts stages in the same table."""
    cfg = parse_settings(pipeline.Settings, ["--preset", "tiny", "--root", str(tmp_path)], presets=pipeline.PRESETS)
    jobs = pipeline.plan(cfg)
    main = [j.name for j in jobs if j.main_lane]
    assert main == ["phantom", "preprocess", "dcgan", "dcgan_demo", "eval_dcgan", "vae", "vae_demo", "diffusion"]
    assert [j.name for j in jobs[:len(main)]] == main
    kinds = list(pipeline.ORDER)
    pool = [kinds.index(j.kind) for j in jobs if not j.main_lane]
    assert pool == sorted(pool) and jobs[-1].kind == "ground_truth"
    # the metadata method's own set first (seconds), then the oracles
    assert [j.name for j in jobs[len(main):len(main) + 3]] == ["metadata_phantom", "metadata_preprocess", "oracle"]
    fit, score = (next(j for j in jobs if j.name == name) for name in ("oracle_fit", "oracle"))
    assert (fit.cfg.seed, fit.cfg.width) != (score.cfg.seed, score.cfg.width) and fit.output != score.output
    supervised = next(j for j in jobs if j.name == "dcgan_supervised")
    truth = next(j for j in jobs if j.name == "truth_dcgan")
    assert supervised.cfg.oracle == str(fit.output / "oracle.pt") and truth.cfg.oracle == str(score.output / "oracle.pt")
    assert truth.cfg.fit_oracle == supervised.cfg.oracle
    assert pipeline.STAGES == ("phantom", "preprocess", "train_gan", "train_vae", "train_diffusion", "oracle",
                               "validate", "directions", "evaluate", "ground_truth", "disentanglement")
    with_grid = parse_settings(pipeline.Settings, ["--preset", "tiny", "--root", str(tmp_path), "--direction-presets",
                                                   "demo", "unit-lenet"], presets=pipeline.PRESETS)
    main = [j.name for j in pipeline.plan(with_grid) if j.main_lane]
    assert main[:6] == ["phantom", "preprocess", "dcgan", "dcgan_demo", "eval_dcgan_demo", "dcgan_unit-lenet"]


def test_the_demo_measures_the_random_baselines_rca_and_the_benchmark_every_methods(tmp_path):
    """RCA trains a fresh reconstructor per method (about a minute at demo size): the demo measures it for the
    random directions, the reference the learned RCA is read against; the benchmark for every closed-form method."""
    def rca(*flags):
        cfg = parse_settings(pipeline.Settings, ["--root", str(tmp_path), *flags], presets=pipeline.PRESETS)
        return {j.name: j.cfg.rca for j in pipeline.plan(cfg) if j.kind == "baselines" and hasattr(j.cfg, "rca")}

    demo = rca()
    assert demo["dcgan_random"] and demo["vae_random"]
    assert not any(demo[n] for n in ("dcgan_sefa", "vae_spectral", "vae_metadata", "dcgan_unmix", "vae_supervised"))
    bench = rca("--preset", "benchmark")
    assert all(bench[f"{g}_{m}"] for g in ("dcgan", "vae") for m in ("sefa", "pca", "spectral", "random"))
    assert rca("--rca-baselines", "sefa")["dcgan_sefa"] and not rca("--rca-baselines", "sefa")["dcgan_random"]
    with pytest.raises(UserError, match="--rca-baselines: \\['learned'\\] are not closed-form methods"):
        rca("--rca-baselines", "learned")


def test_the_benchmark_scores_every_method_on_three_seeds_or_draws(tmp_path):
    """--seed-draws 3: learned, DisCo and LatentCLR trained again on seeds 1 and 2, the unmixed directions taken
    again from those seeds' latents, every method scored again on those report-latent draws, and the main table
    takes their ground truths."""
    cfg = parse_settings(pipeline.Settings, ["--preset", "benchmark", "--root", str(tmp_path)],
                         presets=pipeline.PRESETS)
    jobs = {job.name: job for job in pipeline.plan(cfg)}
    assert cfg.seed_draws == 3 and jobs["dcgan_demo_seed2"].cfg.seed == 2 and jobs["dcgan_disco_seed1"].cfg.seed == 1
    draw = jobs["truth_dcgan_seed1"].cfg
    assert draw.seed == 1 and draw.directions.endswith("dcgan_demo_seed1/directions.pt")
    assert any(c.endswith("dcgan_sefa/directions.pt") for c in draw.compare)          # seed-free: the same file
    assert any(c.endswith("dcgan_latentclr_rca_seed1/directions.pt") for c in draw.compare)
    # the unmixed directions' walks take 64 latents of the prior: drawn again on each seed, like a trained method's
    unmix, first = jobs["dcgan_unmix_seed1"], jobs["dcgan_unmix"]
    assert unmix.cfg.seed == 1 and first.cfg.seed == 0 and unmix.output != first.output
    assert first.cfg.rca and not unmix.cfg.rca  # the tables keep the first draw's RCA
    assert (unmix.cfg.unmix_from, unmix.cfg.unmix_by, unmix.cfg.unmix_content) == (
        first.cfg.unmix_from, first.cfg.unmix_by, first.cfg.unmix_content)
    assert str(unmix.output / "directions.pt") in draw.compare
    assert "dcgan_unmix_seed1" in jobs["truth_dcgan_seed1"].inputs
    assert str(first.output / "directions.pt") not in draw.compare
    assert jobs["validate"].cfg.dcgan.endswith("dcgan/generator.pt") and "dcgan" in jobs["validate"].inputs
    main = jobs["truth_dcgan"]
    assert [Path(f).parent.parent.name for f in main.cfg.seed_runs] == ["dcgan_seed1", "dcgan_seed2"]
    assert {"truth_dcgan_seed1", "truth_dcgan_seed2"} <= set(main.inputs) and main.cfg.seed == 0
    demo = {j.name: j for j in pipeline.plan(parse_settings(pipeline.Settings, ["--root", str(tmp_path)],
                                                            presets=pipeline.PRESETS))}
    assert "truth_dcgan_seed1" not in demo and "dcgan_unmix_seed1" not in demo
    # the DCGAN's metadata method (every slice embedded: half an hour) runs in the benchmark only
    meta = jobs["dcgan_metadata"]
    assert meta.cfg.metadata_data.endswith("metadata_slices_64") and "metadata_preprocess" in meta.inputs
    assert "dcgan_metadata" not in demo and "vae_metadata" in demo


def test_the_unmixed_span_is_the_whole_latent_or_a_named_base(tmp_path):
    def unmix_job(*flags):
        cfg = parse_settings(pipeline.Settings, ["--root", str(tmp_path), *flags], presets=pipeline.PRESETS)
        jobs = {j.name: j for j in pipeline.plan(cfg)}
        return jobs["dcgan_unmix"], jobs
    whole, jobs = unmix_job()
    assert whole.cfg.unmix_from == "latent" and whole.inputs == ("dcgan",) and whole.cfg.unmix_content == 8
    assert "vae_spectral" in jobs and jobs["vae_unmix"].cfg.unmix_from == "latent"  # spectral: a row of its own
    named, jobs = unmix_job("--dcgan-unmix-base", "pca", "--unmix-content", "2")
    assert named.cfg.unmix_from.endswith("dcgan_pca/directions.pt") and named.inputs == ("dcgan_pca",)
    assert named.cfg.unmix_content == 2 and not jobs["dcgan_pca"].cfg.rca and named.cfg.unmix_size == 12
    with pytest.raises(UserError, match="--unmix-content: must be 0 or more"):
        unmix_job("--unmix-content", "-1")
    _, jobs = unmix_job("--vae-methods", "random", "unmix")  # the whole latent needs no base run
    assert "vae_spectral" not in jobs and jobs["vae_unmix"].inputs == ("vae",)
    with pytest.raises(UserError, match="--unmix-content: 7 content rows and six walks do not fit the dcgan's span "
                                        "of 12 \\(--dcgan-unmix-base sefa\\): pass --unmix-content 6 or fewer"):
        unmix_job("--dcgan-unmix-base", "sefa", "--unmix-content", "7")
    assert unmix_job("--unmix-content", "7")[0].cfg.unmix_content == 7   # the whole latent has room for it
    with pytest.raises(UserError, match="span of 32"):
        unmix_job("--unmix-content", "27")


def test_the_readme_reports_the_spread_of_repeated_ground_truths(tmp_path):
    from latentct.show import results

    anim = tmp_path / "Animations" / "demo"
    anim.mkdir(parents=True)
    row = dict(generator="vae", method="sefa", recovered_at={"0.5": 3, "0.67": 0, "0.8": 0}, auc=0.2, p=0.09)
    rows = [dict(row, seed=s, threads=n, verdict="not above null, borderline") for s in (0, 1) for n in (1, 2)]
    rows[-1].update(verdict="above null, borderline", p=0.04)
    # above the null in every repeat, borderline in one: not a flip
    steady = [dict(row, method="unmix", seed=s, threads=n, p=p, verdict=v) for (s, n), p, v in
              zip([(0, 1), (0, 2), (1, 1), (1, 2)], [0.005, 0.005, 0.02, 0.02],
                  ["above null"] * 2 + ["above null, borderline"] * 2)]
    # a confident verdict that flips: no "borderline" excuse
    confident = [dict(row, generator="dcgan", seed=s, threads=n, p=p, verdict=v) for (s, n), p, v in
                 zip([(0, 1), (0, 2), (1, 1), (1, 2)], [0.001, 0.001, 0.3, 0.3],
                     ["above null"] * 2 + ["not above null"] * 2)]
    (anim / "stability.json").write_text(json.dumps({"rows": rows + steady + confident,
                                                     "largest_move": {"vae sefa": 1, "vae unmix": 0}}))
    assert results.spread_line(anim)[1] == (
        "Spread: the ground truth repeated with 1 and 2 threads and report-latent seeds 0 and 1 (`python -m "
        "bench.stability --run demo`): no count moved by more than 1; verdicts that flipped between above and not "
        "above the null: vae sefa (p 0.040-0.090, borderline in every repeat), dcgan sefa (p 0.001-0.300).")
    assert results.spread_line(tmp_path) == []


def test_the_diffusion_benchmark_plans_both_views_and_leaves_the_demo_run_alone(tmp_path):
    cfg = parse_settings(pipeline.Settings, ["--preset", "benchmark-diffusion", "--root", str(tmp_path)],
                         presets=pipeline.PRESETS)
    jobs = {job.name: job for job in pipeline.plan(cfg)}
    assert cfg.run == "benchmark-diffusion" and "dcgan" not in jobs and "vae" not in jobs
    assert jobs["validate"].cfg.vae is None and jobs["diffusion"].main_lane
    assert jobs["diffusion"].cfg.space == "latent" and jobs["diffusion"].cfg.autoencoder_steps == 2000
    for view, first in (("noise", "spectral"), ("h", "hpca")):
        truth = jobs[f"truth_diffusion_{view}"].cfg
        assert truth.directions.endswith(f"diffusion_{view}_{first}/directions.pt") and truth.null_pool == 256
        assert truth.compare[-1].endswith(f"diffusion_{view}_supervised/directions.pt")
        method = jobs[f"diffusion_{view}_spectral"].cfg
        assert (method.diffusion_view, method.ddim_steps, method.directions_count, method.rca) == (view, 10, 8, False)
    assert jobs["diffusion_h_unmix"].cfg.unmix_from.endswith("diffusion_h_spectral/directions.pt")
    with pytest.raises(UserError, match="--diffusion-noise-methods: hpca needs the h view"):
        parse_settings(pipeline.Settings, ["--diffusion-noise-methods", "hpca"], presets=pipeline.PRESETS)


def test_the_diffusion_comparison_is_written_from_the_tables():
    from latentct.show.results import diffusion_comparison

    def row(count, auc, p, verdict, recoverable, supervision="none"):
        return {"recovered_at": {"0.67": count}, "auc": auc, "p_value": {"auc": p}, "verdict": verdict,
                "recoverable": recoverable, "supervision": supervision}

    factors = {f: 0.99 for f in ("z_position", "y_offset", "rotation", "thickness", "width", "breast_size")}
    noise = {"oracle_r2": factors, "methods": {"spectral": row(1, 0.2, 0.3, "not above null", 6),
                         "unmix": row(3, 0.5, 0.01, "above null, borderline", 6),
                         "random": row(4, 0.6, 0.001, "above null", 6),  # a reference, never the pick
                         "supervised": row(6, 1.0, 0.001, "above null", 6, "labels")}}
    h = {"oracle_r2": factors, "methods": {"hpca": row(2, 1.1, 0.08, "not above null, borderline", 2),
                     "supervised": row(2, 1.0, 0.07, "not above null, borderline", 2, "labels")}}
    text = diffusion_comparison([("diffusion_noise", noise), ("diffusion_h", h)], [("dcgan", noise)])
    assert text.startswith("Best label-free separation of the anatomy above the null: the diffusion_noise view "
                           "with unmix.")
    assert "holds the most factors linearly (the supervised ceiling at 2/3): diffusion_noise, 6 of 6" in text
    assert "diffusion_h: hpca, 2 of 2 (area 1.10, p 0.080, not above null, borderline); the supervised directions " \
           "recover 2 of 6" in text and "The GAN and the VAE" in text and "dcgan: unmix, 3 of 6" in text
    noise["methods"]["unmix"]["verdict"] = "not above null"
    assert diffusion_comparison([("diffusion_noise", noise)], []).startswith("No label-free method separates")


def test_the_spread_across_machines_names_what_moved_and_only_runs_of_the_same_settings(tmp_path):
    from latentct.show import results

    def row(count, p, supervision="none"):
        return {"recovered_at": {"0.5": count, "0.67": count, "0.8": 0}, "recoverable": 5, "auc": 0.3,
                "p_value": {"auc": p}, "verdict": "above null" if p < 0.05 else "not above null",
                "supervision": supervision}

    def record(sefa, p, unmix, workers, seed=0, commit="abc1234"):
        return {"run": "demo", "settings": {"seed": seed, "workers": workers, "root": "."}, "machine": "CPU X, 2 cores",
                "commit": commit, "generators": {"dcgan": {"recoverable_at": {"0.67": 5 if sefa else 6},
                                                           "methods": {"sefa": row(sefa, p), "unmix": row(unmix, 0.001),
                                                                       "supervised": row(5, 0.001, "labels")}}}}

    here = record(1, 0.038, 2, workers=2)
    folder = tmp_path / "machines"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(record(0, 0.273, 2, workers=1, commit="def5678")))  # how it ran: same
    (folder / "b.json").write_text(json.dumps(record(3, 0.001, 3, workers=2, seed=1)))         # another seed: left out
    (folder / "self.json").write_text(json.dumps({**here, "commit": "0ld0ld0"}))  # this run, recorded at another commit
    line = " ".join(results.machines_line(here, folder))
    assert "this run (CPU X, 2 cores, abc1234) beside 1 other recorded run of the same seed and settings" in line
    assert "def5678" in line and "0ld0ld0" not in line and "Not every run recorded its generators' weights" in line
    assert "Recoverable at 2/3: dcgan 5-6." in line
    assert "Counts at 2/3 that differ: dcgan sefa 0-1." in line                  # unmix and supervised held
    assert "flip between above and not above the null: dcgan sefa (p 0.038-0.273)." in line
    assert results.machines_line(here, tmp_path / "none") == []
    bare = record(2, 0.5, 2, workers=2, commit="fff0000")              # no supervised row: no recoverable count
    bare["generators"]["dcgan"]["recoverable_at"] = None
    del bare["generators"]["dcgan"]["methods"]["unmix"]
    (folder / "c.json").write_text(json.dumps(bare))
    line = " ".join(results.machines_line(here, folder))
    assert "Recoverable at 2/3: not scored." in line and "dcgan sefa 0-2" in line
    assert "Not in every run, so not compared: dcgan unmix." in line
    (folder / "c.json").unlink()
    (folder / "a.json").unlink()
    assert results.machines_line(here, folder) == []                             # nothing comparable is left
    # a run is known by its generators' weights: rescored (other numbers, another commit) it is still this run,
    # and another machine's generators with the very same numbers are a second run (a reproduction), not this one
    timed = dict(here, wall_seconds=1487.5, weights={"dcgan": "aa"})
    (folder / "self.json").write_text(json.dumps(dict(timed, commit="fff1111", wall_seconds=301.0, generators={
        "dcgan": {"recoverable_at": None, "methods": {}}})))
    (folder / "twin.json").write_text(json.dumps(dict(timed, machine="CPU Y, 2 cores", weights={"dcgan": "bb"})))
    line = " ".join(results.machines_line(timed, folder))
    assert "beside 1 other recorded run" in line and "CPU Y, 2 cores, abc1234" in line and "fff1111" not in line
    assert "Generator weights (sha256): dcgan differ." in line and "Counts at 2/3 that differ: none." in line
    (folder / "twin.json").write_text(json.dumps(dict(timed, machine="CPU Y, 2 cores")))   # the same generators
    assert results.machines_line(timed, folder) == []


def test_stability_repeats_every_draw_of_a_benchmark_ground_truth_on_disjoint_report_latents(tmp_path, monkeypatch):
    """bench.stability on a run whose ground truth merges other draws (--seed-draws 3): each repeat scores every
    draw again, from its own gallery's report, with report-latent seeds shifted by seed x 3 (repeat 0: the run's
    0, 1, 2; repeat 1: 3, 4, 5), and the medians come from those fresh draws, not from the files the run kept."""
    from bench import stability

    anim = tmp_path / "Animations" / "b"
    kept = [f"Animations/b/dcgan_seed{s}/ground_truth/ground_truth.json" for s in (1, 2)]
    for name, seed in (("dcgan", 0), ("dcgan_seed1", 1), ("dcgan_seed2", 2), ("vae", 5)):
        (anim / name / "ground_truth").mkdir(parents=True)
        (anim / name / "report.json").write_text(json.dumps({"gallery": name}))
        config = {"seed": seed, "ground_truth": "auto", "directions": f"runs/b/{name}/directions.pt", "seed_runs": []}
        if name in ("dcgan", "vae"):      # a benchmark gallery of three draws; a demo-like one of one, seed 5
            config.update(ground_truth="only", seed_runs=kept if name == "dcgan" else [])
            (anim / name / "ground_truth" / "config.json").write_text(json.dumps(config))
        else:
            (anim / name / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_run(command, check, env, cwd, stdout):
        flags, key = {}, None
        for word in command[2:]:
            if word.startswith("--"):
                key = word[2:]
                flags[key] = []
            else:
                flags[key].append(word)
        out = Path(flags["output"][0])
        calls.append({"seed": int(flags["seed"][0]), "seed_runs": flags.get("seed-runs", []),
                      "report": json.loads((out / "report.json").read_text())["gallery"],
                      "directions": flags["directions"][0], "output": out, "threads": env["OMP_NUM_THREADS"]})
        (out / "ground_truth").mkdir()
        (out / "ground_truth" / "ground_truth.json").write_text(json.dumps({"methods": {"sefa": {
            "recovered_at": {"0.5": 1, "0.67": 1, "0.8": 0}, "auc": 0.2, "p_value": {"auc": 0.01},
            "verdict": "above null"}}}))

    monkeypatch.setattr(stability, "ROOT", tmp_path)
    monkeypatch.setattr(stability.subprocess, "run", fake_run)
    rows = stability.main(stability.Settings(run="b", root=str(tmp_path), seeds=[0, 1], threads=[2]))
    assert [c["seed"] for c in calls] == [1, 2, 0, 4, 5, 3, 5, 6]  # the demo-like gallery: its seed, then + 1
    assert [c["report"] for c in calls] == ["dcgan_seed1", "dcgan_seed2", "dcgan"] * 2 + ["vae"] * 2
    assert all(c["directions"] == f"runs/b/{c['report']}/directions.pt" for c in calls)  # each draw its own
    for draws, main_call in ((calls[0:2], calls[2]), (calls[3:5], calls[5])):  # merges exactly its fresh draws
        assert main_call["seed_runs"] == [str(d["output"] / "ground_truth" / "ground_truth.json") for d in draws]
    assert calls[0]["output"].parent != calls[3]["output"].parent and {c["threads"] for c in calls} == {"2"}
    assert all(c["seed_runs"] == [] for c in calls if c["report"] != "dcgan")
    assert [(r["generator"], r["seed"], r["report_seeds"]) for r in rows] == [
        ("dcgan", 0, [0, 1, 2]), ("dcgan", 1, [3, 4, 5]), ("vae", 0, [5]), ("vae", 1, [6])]
    (anim / "dcgan_seed2" / "report.json").unlink()
    with pytest.raises(UserError, match="dcgan_seed2: no config.json or report.json"):
        stability.main(stability.Settings(run="b", root=str(tmp_path), seeds=[0], threads=[1]))


def test_subspace_cost_times_each_ground_truth_with_and_without_the_image_measure(tmp_path, monkeypatch):
    """bench.subspace_cost alternates the run's own settings with the image measure and random ceilings off, on
    one draw of each gallery, and says whether the counts agree."""
    import bench.subspace_cost as cost

    for gallery in ("dcgan", "vae"):
        folder = tmp_path / "Animations" / "r" / gallery
        (folder / "ground_truth").mkdir(parents=True)
        (folder / "report.json").write_text("{}")
        (folder / "ground_truth" / "config.json").write_text(json.dumps(
            {"seed": 3, "subspace_latents": 16, "subspace_randoms": 8, "seed_runs": ["other.json"]}))
    calls = []

    def fake_score(config, report, seed, threads, out):
        calls.append((report.parent.name, config["subspace_latents"], config["subspace_randoms"], config["seed_runs"],
                      seed, threads))
        out.mkdir(parents=True)
        counts = {"0.5": 2, "0.67": 1 + (config["subspace_latents"] == 0 and report.parent.name == "vae"), "0.8": 0}
        (out / "ground_truth.json").write_text(json.dumps({"methods": {"sefa": {"recovered_at": counts}}}))
        return out / "ground_truth.json"

    monkeypatch.setattr(cost, "score", fake_score)
    out = cost.main(cost.Settings(run="r", root=str(tmp_path), repeats=2, threads=1))
    assert [c[:2] for c in calls[:4]] == [("dcgan", 16), ("dcgan", 0), ("dcgan", 16), ("dcgan", 0)]
    assert all(c[3] == [] and c[4] == 3 and c[5] == 1 for c in calls) and len(calls) == 8
    assert all(c[2] == (8 if c[1] else 0) for c in calls)
    assert out["dcgan"]["same_counts"] and not out["vae"]["same_counts"]
    assert len(out["dcgan"]["seconds"]["with"]) == 2 and out["dcgan"]["ratio"] > 0
    with pytest.raises(UserError, match="--run: no ground truth"):
        cost.main(cost.Settings(run="missing", root=str(tmp_path)))


def test_cores_bench_launches_one_thread_every_thread_and_one_thread_per_core(monkeypatch):
    """bench.cores times one thread alone, one process with every thread and one one-thread process per core side
    by side, and gives each as a ratio to the first; its worker times the real training step."""
    import bench.cores as cores

    calls = []

    def fake_launch(steps, threads, count):
        calls.append((steps, threads, count))
        return {(1, 1): [2.0], (4, 1): [5.0], (1, 4): [1.5, 1.5, 1.0, 2.0]}[(threads, count)]

    monkeypatch.setattr(cores, "launch", fake_launch)
    out = cores.main(cores.Settings(steps=3, cores=4))
    assert calls == [(3, 1, 1), (3, 4, 1), (3, 1, 4)]
    assert out["main_lane_ratio"] == pytest.approx(2.5) and out["pool_ratio"] == pytest.approx(3.0)
    assert out["pool_over_main_lane"] == pytest.approx(6.0 / 5.0)
    assert cores.time_steps(1) > 0
