"""The result tables, produced from a pipeline run's summary.json and reports, never typed by hand.

    python -m latentct.show.results --run demo                           # after python pipeline.py
    python -m latentct.show.results --run benchmark --block benchmark    # after --preset benchmark --run benchmark
    python -m latentct.show.results --run demo --readme none --docs none # print, write nothing

Each call writes two files. ``--docs`` (docs/results.md) gets the full tables of the run, between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` with NAME the block: ``results`` (the demo: stages, example
sweeps, generators, known-answer sweeps, every gallery's ground truth) or ``benchmark`` (every method with MIG
and DCI, and the budget curves when bench/budget.py has run). ``--readme`` (README.md) gets the short blocks:
from the demo ``examples`` (the example GIF row with captions) and ``results`` (at a glance: per generator and
method, recovered at tau 2/3 of recoverable, area, p, verdict); from the benchmark ``benchmark`` (the same
table for every method, and which label-free method to try first on each generator). ``--record FILE`` also keeps
the run's headline with its machine and commit (bench/machines/); the demo's results block sets every recorded
run of the same settings beside it (the spread across machines).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latentct.util.io import atomic_write_json, atomic_write_text
from latentct.util.settings import UserError, code_version, load_settings, machine_name, run_cli, setting

# Shapes3D MIG of the same direction methods under the same protocol, as the published comparisons report them
# (Khrulkov et al. 2021; DisCo, ICLR 2022): the reference the benchmark's MIG column stands beside.
PUBLISHED_SHAPES3D_MIG = {"sefa": 0.283, "pca": 0.116, "learned": 0.177}
PUBLISHED_NAMES = {"sefa": "SeFa", "pca": "GANSpace", "learned": "Voynov & Babenko"}


@dataclass
class Settings:
    """Write a pipeline run's result tables: the full ones into docs/results.md, the short ones into the README."""

    run: str = setting("demo", "the pipeline run (Animations/<run>/summary.json)")
    root: str = setting(".", "folder that holds Animations/ and runs/")
    readme: str | None = setting("README.md", "the README whose short blocks (example GIFs, results at a glance) "
                                 "are replaced; none: print them instead")
    docs: str | None = setting("docs/results.md", "the page whose full-table block is replaced; none: print it "
                               "instead")
    baseline: str | None = setting(None, "summary.json of another run of the same pipeline (an older version on the "
                                   "same machine): a per-stage wall-time comparison")
    examples: int = setting(2, "example GIFs per gallery copied to Animations/examples/ (the cleanest label-free "
                            "directions of any method the gallery scored, with different labels)")
    block: str = setting("results", "which run kind: results (the demo), benchmark (every method, MIG/DCI, "
                         "the budget curves) or diffusion (--preset benchmark-diffusion: both views against the "
                         "--compare-run's DCGAN and VAE)", choices=("results", "benchmark", "diffusion"))
    record: str | None = setting(None, "also write the run's headline (per generator and method: counts at each tau, "
                                 "area, p, verdict), with this machine's CPU and the commit, to this JSON file "
                                 "(e.g. bench/machines/<name>.json): another machine's figures for the spread")
    machines: str | None = setting("bench/machines", "folder of such records: the demo's results block gives the "
                                   "spread across them and this run where they ran the same settings; none: leave "
                                   "it out")
    compare_run: str | None = setting("demo", "with --block diffusion: the run whose DCGAN and VAE tables the "
                                      "diffusion model is compared with (same phantom and image size)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; run `python pipeline.py` first")
    return json.loads(path.read_text())


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def made_by(summary: dict) -> dict:
    """The timing, machine and commit of the run that made a run's outputs: the summary's own, or, where a later
    invocation reran some stages (pipeline.py keeps the earlier run's under "reused"), the earlier run's."""
    return summary.get("reused") or summary


def _minutes(seconds: float) -> str:
    whole = int(round(seconds))  # 239.5 s is 4 min 0 s, not 3 min 60 s
    return f"{whole // 60} min {whole % 60} s"


def stage_table(summary: dict) -> str:
    rows = [[r["stage"], r["name"], "cached" if r["cached"] else f"{r['seconds']:.0f} s",
             f"{r.get('finished_at', 0):.0f} s", r["metric"]] for r in summary["stages"]]
    return _table(["stage", "run", "time", "done at", "key figure"], rows)


def generator_table(runs: Path, names: list[str]) -> str:
    """Last evaluation of each generator beside the real-vs-real floor of its metrics.jsonl."""
    rows = []
    for name in names:
        records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines() if line]
        evals = [r for r in records if "eval" in r]
        floor = next((r["real_vs_real"] for r in records if "real_vs_real" in r), {})
        if not evals:
            continue
        last = evals[-1]
        rows.append([name, last["step"], f"{last['eval']['swd']:.1f}", f"{floor['swd']:.1f}" if floor else "–",
                     f"{last['eval']['diversity_ratio']:.2f}", f"{last['eval']['anatomy_distance']:.2f}"])
    return _table(["generator", "steps", "SWD", "real-vs-real SWD", "diversity ratio", "anatomy distance"], rows)


def _p(value) -> str:
    return "–" if value is None else f"{value:.3f}"


USES = {"metadata": "patient and slice position", "measurements": "anatomy measurements"}


def shown(method: str, table: dict) -> str:
    """A method's name in the tables, with what it used beyond the generator where it is not label-free."""
    used = table.get("supervision", "none")
    return method if used in ("none", "labels") else f"{method} (uses {USES.get(used, used)})"


def headline(table: dict) -> list[str]:
    """One method's headline cells: recovered at tau 2/3 (of recoverable), area, p (of the area, else of the
    count at 2/3) and the verdict against the pooled null."""
    of = f" of {table['recoverable']}" if table.get("recoverable") is not None else "/6"
    p = table.get("p_value") or {}
    auc = "–" if table.get("auc") is None else f"{table['auc']:.2f}"
    return [f"{table['recovered_at']['0.67']}{of}", auc, _p(p.get("auc")),
            table.get("verdict", "–")]


def ground_truth_table(gt: dict) -> str:
    """Per method: RCA, recovered at tau 0.5 / 2/3 / 0.8, the headline (at 2/3, of recoverable) with its area and
    p-value against the pooled null, effect-DCI and, per factor, the direction that stands for it at tau 2/3."""
    factors = list(gt["oracle_r2"])
    rows = []
    for method, table in gt["methods"].items():
        found = {m["factor"]: m for m in table["matches"]["0.67"]}
        cells = [f"k={found[f]['direction']} ({found[f]['share']:.2f})" if f in found else "–" for f in factors]
        rca = "–" if table.get("rca") is None else f"{table['rca']:.2f}"
        at, dci = table["recovered_at"], table["effect_dci"]
        rows.append([shown(method, table), rca, f"{at['0.5']} / {at['0.67']} / {at['0.8']}", *headline(table),
                     f"{dci['disentanglement']:.2f}", *cells])
    return _table(["method", "RCA", "recovered at 0.5 / 2/3 / 0.8", "at 2/3 (of recoverable)", "area", "p",
                   "verdict", "effect-D", *factors], rows)


def subspace_rows(entries: dict) -> list[list[str]]:
    """Per method (name -> subspace entry): its span's size k, the principal angles to the reference span, each
    reference direction's share inside the span (chance beside them) and, where there is one, the span ceiling
    (a random span's of the same size beside it). Where the entry has the image-change measure, each angle range,
    share and chance reads "latent / image"."""
    def between(low, high, form):
        low, high = format(low, form), format(high, form)
        return low if low == high else f"{low}-{high}"

    def spread(angles):
        return "–" if not angles else between(angles[0], angles[-1], ".0f") + "°"

    def count(at):
        return f"{at['0.5']} / {at['0.67']} / {at['0.8']}"

    rows = []
    for method, sub in entries.items():
        image = sub.get("image")
        angles, shares = spread(sub["angles_deg"]), [f"{v:.2f}" for v in sub["share_in_span"].values()]
        chance = f"{sub['chance']:.2f}"
        if image:
            angles += f" / {spread(image['angles_deg'])}"
            shares = [f"{a} / {v:.2f}" for a, v in zip(shares, image["share_in_span"].values())]
            chance += " / " + ("–" if not image["chance"] else between(min(image["chance"].values()),
                                                                       max(image["chance"].values()), ".2f"))
        ceiling, chance_ceiling = sub.get("span_ceiling_at"), sub.get("span_ceiling_chance_at")
        rows.append([method, str(sub["k"]), angles, *shares, chance,
                     "–" if not ceiling else count(ceiling) + (f" (random span {count(chance_ceiling)})"
                                                               if chance_ceiling else "")])
    return rows


def method_subspaces(gt: dict) -> dict:
    return {m: t["subspace"] for m, t in gt["methods"].items() if t.get("subspace")}


def subspace_table(gt: dict) -> str:
    rows = subspace_rows(method_subspaces(gt))
    if not rows:
        return ""
    factors = list(gt["oracle_r2"])
    if any(sub.get("image") for sub in method_subspaces(gt).values()):
        return _table(["method", "k", "principal angles (latent / image)", *(f"{f} in span" for f in factors),
                       "chance (latent sqrt(k/d) / image, over factors)", "span ceiling at 0.5 / 2/3 / 0.8"], rows)
    return _table(["method", "k", "principal angles", *(f"{f} in span" for f in factors), "chance sqrt(k/d)",
                   "span ceiling at 0.5 / 2/3 / 0.8"], rows)


SUBSPACE_NOTE = ("Right subspace, wrong basis? Each method's span (the top k = recoverable at 2/3 of SeFa, PCA and "
                 "spectral, all directions of the others) against the supervised directions' span: principal angles, "
                 "and the share of each factor's supervised direction inside it, measured twice: in the latent's "
                 "coordinates (a random span holds about sqrt(k/d)) and on the image changes the directions make "
                 "(the pullback metric averaged over latents; chance: the mean share random spans of the same size "
                 "hold). The image measure is the one to read where a generator leaves latent dimensions unused (a "
                 "VAE): a direction's norm there moves nothing. Then the span ceiling, the supervised map refitted "
                 "inside the span with the fit oracle and scored like every direction: what the method would recover "
                 "if its basis were right, beside the ceiling of random spans of the same size (the median of 3): a "
                 "span large enough holds the factors whatever its basis.")


def _ground_truths(summary: dict) -> list[tuple[str, dict]]:
    """(generator, ground truth) of every gallery that has one, in the run's order."""
    out = []
    for row in (r for r in summary["stages"] if r["stage"] == "evaluate"):
        report = _read_json(Path(row["output"]) / "report.json")
        if report.get("ground_truth"):
            out.append((Path(row["output"]).name, report["ground_truth"]))
    return out


def glance_table(truths: list[tuple[str, dict]]) -> str:
    """Results at a glance: per generator and method, the headline cells of the ground-truth table."""
    rows = [[gen, shown(method, table), *headline(table)] for gen, gt in truths for method, table in gt["methods"].items()]
    return _table(["generator", "method", "recovered at 2/3 (of recoverable)", "area", "p", "verdict"], rows)


# References, not methods to pick: random directions (the null's kind) and the supervised ceiling (needs labels).
REFERENCES = ("random", "supervised")
CLOSED_FORM = ("sefa", "pca", "spectral", "coordinate")  # computed in seconds to a minute, no training
FITTED = ("ica", "spca", "unmix", "hpca")  # estimators fitted to the generator's samples in minutes, no network trained


def label_free(gt: dict) -> dict:
    """The ground truth's label-free method rows, the references (random, supervised) left out."""
    return {m: t for m, t in gt["methods"].items()
            if t.get("supervision", "none") == "none" and m.split(" (")[0] not in REFERENCES}


def rank(table: dict) -> tuple:
    """How method rows order: factors recovered at tau 2/3, then the area (none below any)."""
    return table["recovered_at"]["0.67"], -1.0 if table.get("auc") is None else table["auc"]


def first_choice(gen: str, gt: dict) -> str:
    """The label-free method(s) with the most factors recovered at tau 2/3 on one generator (ties: the larger
    area), with its count, area and verdict, and what the supervised directions recover there."""
    free = label_free(gt)
    if not free:
        return f"On the {gen}, no label-free method was scored."
    top = max(rank(t) for t in free.values())
    best = [m for m, t in free.items() if rank(t) == top]

    def said(m):
        count, auc, p, word = headline(free[m])
        kind = "closed form" if m in CLOSED_FORM else "fitted, nothing trained" if m in FITTED else "trained"
        return f"{m} ({kind}: {count} recoverable, area {auc}, p {p}, {word})"

    verb = "is" if len(best) == 1 else "are"
    text = (f"On the {gen}, the label-free method{'s' if len(best) > 1 else ''} with the most factors recovered at "
            f"tau 2/3 {verb} " + " and ".join(said(m) for m in best) + ".")
    sup = gt["methods"].get("supervised")
    if sup is not None:
        text += f" The supervised directions (labels) recover {sup['recovered_at']['0.67']}."
    return text


def sweep_label(sweep: dict) -> str:
    """A known-clean sweep's anatomy label as a user sees it (validation files before the label text was kept
    hold only the measurement with the largest score: shown as such)."""
    return sweep["label"] if "leads_with" in sweep else f"{sweep['label']} (largest score; label text not kept)"


def labels_ok(checks: dict) -> str:
    """How many known-clean sweeps' labels lead with the expected measurement, and name it alone."""
    if "labels_single" not in checks:
        return f"{checks['labels_ok']}/6 with the expected measurement the largest"
    return (f"{checks['labels_ok']}/6 labels led by the expected measurement ({checks['labels_single']}/6 naming it "
            "alone, the rest a mixture of measurements that move together)")


def validation_table(validation: dict) -> str:
    """The score oracle's R2 (held out, on VAE reconstructions, and the bound a probe trained on reconstructions
    reaches), how much of each factor's change it reads on reconstructions beside how much the VAE draws (an
    anatomy measurement, no model; validate.generated_r2), its agreement with the fit oracle, the attainable
    share through the VAE, and what the known-answer sweeps show per factor."""
    def cell(value):
        return "–" if value is None else f"{value:.3f}"

    def kept(s, name):
        value, (low, high) = s.get(name), s.get(f"{name}_interval", (None, None))
        if value is None:
            return "–"
        return f"{value:.2f}" + ("" if low is None or high is None else f" ({low:.2f}-{high:.2f})")

    def slopes(oracle):
        s = oracle.get("slope_generated")
        return ["–", "–"] if not s else [kept(s, "read"), f"{kept(s, 'drawn')}, {s['measurement']}"]

    attainable = (validation.get("attainable") or {}).get("vae", {})
    rows = []
    for f, sweep in validation["sweeps"].items():
        oracle = validation["oracle"][f]
        rows.append([f, cell(oracle["r2"]), cell(oracle.get("r2_generated")), cell(oracle.get("bound")),
                     *slopes(oracle), cell(oracle.get("agreement")), cell(attainable.get(f)), sweep["attributed"],
                     f"{sweep['leakage']:.3f}", sweep_label(sweep), sweep["expected_label"]])
    return _table(["factor", "oracle R2 (held out)", "oracle R2 (VAE reconstructions)", "bound (probe on them)",
                   "share of each change the oracle reads there (90% interval)",
                   "share the VAE draws (anatomy measurement, 90% interval)",
                   "agreement of the two oracles", "share a clean change keeps through the VAE",
                   "sweep attributed to", "sweep leakage", "anatomy label (what a user of real CT sees)",
                   "expected to lead with"], rows)


def baseline_table(summary: dict, baseline: dict) -> str:
    """Per stage kind, seconds in the baseline run and in this one, and the wall time and first gallery."""
    def by_stage(rows):
        out = {}
        for r in rows:
            out[r["stage"]] = out.get(r["stage"], 0.0) + r["seconds"]
        return out

    old, new = by_stage(baseline["stages"]), by_stage(summary["stages"])
    rows = [[stage, f"{old.get(stage, 0):.0f} s" if stage in old else "–", f"{new.get(stage, 0):.0f} s"
             if stage in new else "–"] for stage in dict.fromkeys([*old, *new])]
    old_wall = baseline.get("wall_seconds", baseline["total_seconds"])
    old_first = baseline.get("first_gallery_seconds") or _first_gallery(baseline)
    rows.append(["**wall time**", f"{old_wall:.0f} s", f"{summary['wall_seconds']:.0f} s "
                 f"({summary['wall_seconds'] / old_wall:.0%})"])
    rows.append(["**first gallery on disk**", f"{old_first:.0f} s",
                 f"{summary['first_gallery_seconds']:.0f} s ({summary['first_gallery_seconds'] / old_wall:.0%})"])
    return _table(["stage (seconds summed over its jobs)", "baseline", "this run"], rows)


def _first_gallery(summary: dict) -> float:
    """When the first gallery was written in a run that ran its stages one after another."""
    elapsed = 0.0
    for r in summary["stages"]:
        elapsed += r["seconds"]
        if r["stage"] == "evaluate":
            return elapsed
    return elapsed


def _to_examples(anim: Path, source: Path, name: str) -> str:
    """Copy a file to Animations/examples/ (committed, so the README and docs show it); its name there."""
    folder = anim.parent / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / name)
    return name


def examples(anim: Path, galleries: list[dict], count: int) -> list[tuple[str, str]]:
    """Copy the cleanest directions' GIFs to Animations/examples/: (file name, caption). On the phantom, per
    gallery, the label-free directions of every method its ground truth scored (the random and supervised
    references aside) with the largest share on the factor they stand for at tau 2/3, one per factor and none
    shown twice; another method's directions are swept and measured as the gallery's own (``render_others``).
    Elsewhere the gallery's directions with the largest share of one anatomy measurement. The caption names the
    method and the share."""
    from latentct.score.scoring import direction_mark

    picked, used = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for row in galleries:
            gallery = Path(row["output"])
            report = _read_json(gallery / "report.json")
            truth = (report.get("ground_truth") or {}).get("methods") or {}
            own = next(iter(truth), report["method"])  # the gallery's own directions come first in its ground truth
            rows = {(own, d["direction"]): dict(d, gif=str(gallery / d["gif"])) for d in report["directions"]}
            if truth:  # the factor each direction mainly moves, and its share of the direction's effect
                scored = [(name, d) for name, t in truth.items()
                          if t.get("supervision", "none") == "none" and name.split(" (")[0] not in REFERENCES
                          and (name == own or t.get("file")) for d in t["directions"]]
                ranked = sorted(scored, key=lambda nd: (-("stands_for" in nd[1] or "also_for" in nd[1]),
                                                        -nd[1]["share"]))
                candidates = [(name, d["direction"], d["dominant"], direction_mark(d)) for name, d in ranked]
            else:
                ranked = sorted(rows.values(), key=lambda d: -max(d.get("shares", {"": 0}).values()))
                candidates = [(own, d["direction"], max(d["shares"], key=d["shares"].get), "")
                              for d in ranked if d.get("shares")]
            chosen, seen = [], set()
            for name, k, what, mark in candidates:
                source = (truth.get(name, {}).get("file") or report["directions_file"], k)
                if what not in seen and source not in used and len(chosen) < count:
                    chosen.append((name, k, mark))
                    seen.add(what)
                    used.add(source)
            for other in sorted({name for name, _, _ in chosen} - {own}):
                ks = [k for name, k, _ in chosen if name == other]
                found = render_others(gallery, truth[other], ks, Path(tmp) / f"{gallery.name}_{len(picked)}_{other}")
                rows.update(((other, k), r) for k, r in found.items())
            for name, k, mark in chosen:
                label = "_".join([gallery.name, *([name] if name != own else []), str(k)])
                caption = (f"{gallery.name} {shown(name, truth.get(name, {}))} k={k}: "
                           + (f"factor: {mark}; " if mark else "") + f"anatomy: {rows[name, k]['label']}")
                picked.append((rows[name, k]["gif"], re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".gif", caption))
        folder = anim.parent / "examples"  # emptied only once every example is rendered
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.gif"):
            old.unlink()
        return [(_to_examples(anim, Path(gif), name), caption) for gif, name, caption in picked]


def render_others(gallery: Path, table: dict, ks: list[int], out: Path) -> dict[int, dict]:
    """Directions ``ks`` of another method (its ground-truth row ``table``: the file it scored), swept and
    measured as the gallery swept and measured its own (its settings and shift range; no ground truth, real slices
    or label spans): their report rows by direction, each row's "gif" a path under ``out``. Stops where the file
    changed since it was scored, or where the anatomy would be measured in other units than the gallery's."""
    import EvalDirections  # a script at the repository root, as pipeline.py runs it
    from latentct.generators.interface import file_hash

    file = table["file"]
    if not Path(file).is_file() or (table.get("file_sha256") and file_hash(file) != table["file_sha256"]):
        raise UserError(f"{file}: missing or changed since the ground truth scored it; rerun the pipeline's "
                        "ground_truth stage (--from-stage ground_truth) before the results")
    shown_report = _read_json(gallery / "report.json")
    cfg = load_settings(EvalDirections.Settings, gallery / "config.json")
    cfg = dataclasses.replace(cfg, directions=file, output=str(out), which=list(ks), compare=[], ground_truth="off",
                              real_slices=0, label_subspace="off", shift_scale=shown_report["shift_scale"])
    report = EvalDirections.main(cfg)
    for key in ("spacing_mm", "spacing_note", "shift_scale", "window"):
        if report.get(key) != shown_report.get(key):
            raise UserError(f"{file}: its sweeps would be measured with {key} {report.get(key)!r}, the gallery "
                            f"{gallery} measured its own with {shown_report.get(key)!r}; run the results from "
                            "the folder the pipeline ran in")
    return {r["direction"]: dict(r, gif=str(out / r["gif"])) for r in report["directions"]}


def examples_row(picked: list[tuple[str, str]], link: str) -> str:
    """The GIFs in one table row with their captions under them; ``link``: Animations/examples/ as the page
    that shows them reaches it."""
    return _table([f"![]({link}/{name})" for name, _ in picked], [[caption for _, caption in picked]]) if picked else ""


def render(cfg: Settings, link: str = "Animations/examples", picked: list[tuple[str, str]] | None = None) -> str:
    """The demo's full tables (docs/results.md): stages, example sweeps, generators, known-answer sweeps and
    every gallery's ground truth. ``picked``: example GIFs already copied (else they are picked and copied)."""
    root = Path(cfg.root)
    anim, runs = root / "Animations" / cfg.run, root / "runs" / cfg.run
    summary = _read_json(anim / "summary.json")
    galleries = [r for r in summary["stages"] if r["stage"] == "evaluate"]
    made = made_by(summary)
    first = made.get("first_gallery_seconds")
    parts = [f"*Generated by `python -m latentct.show.results --run {cfg.run}` from `Animations/{cfg.run}/summary.json` "
             f"and the reports. Wall time {_minutes(made['wall_seconds'])}"
             + (f", first gallery after {_minutes(first)}" if first else "") + " on the machine that ran it"
             + (f"; the stages not marked cached were run again later, in {_minutes(summary['wall_seconds'])}"
                if made is not summary else "") + ".*",
             "", stage_table(summary)]
    if cfg.baseline:
        parts += ["", f"Against `{cfg.baseline}` (the same demo run by an older version on the same machine):", "",
                  baseline_table(summary, _read_json(Path(cfg.baseline)))]
    if cfg.examples:
        picked = examples(anim, galleries, cfg.examples) if picked is None else picked
        parts += ["", "Example sweeps (the cleanest label-free directions of any method, those that count first, with "
                  "their share; the strip lights up at 0):", "",
                  examples_row(picked, link)]
    parts += ["", "Generators (last evaluation; SWD x1e3 on multi-scale patches):", "",
             generator_table(runs, [r["name"] for r in summary["stages"] if r["stage"].startswith("train_")])]
    validation = anim / "validation" / "validation.json"
    if validation.is_file():
        v = _read_json(validation)
        c, m = v["checks"], v["minimum_effect"]
        parts += ["", f"Known-answer sweeps (seed {v['seed']}; `python -m latentct.score.validate`): {c['attributed']}/6 "
                  f"attributed, {c['leakage_ok']}/6 with leakage <= {v['leakage_target']}, " + labels_ok(c)
                  + f", {c['pairs_ok']}/{c['pairs']} pairs with their factors on top. Noise floors from them at "
                  f"{v['samples']} samples; the smallest effect a recovered factor needs: "
                  + ", ".join(f"{f} {x['value']:.3g} {x['unit']}" for f, x in m.items()) + ".",
                  "", validation_table(v)]
    for gen, gt in _ground_truths(summary):
        parts += ["", f"**{gen}**: a factor is recovered at tau when a direction's effect on "
                  "it, above its noise floor, is more than tau of the direction's whole effect, at least twice the "
                  "floor, with line R2 >= 0.5; each factor cell names the direction that stands for it at tau 2/3 "
                  "(its share). Area: the mean count over tau in [0.5, 1] relative to the supervised row's; p: "
                  "against random direction sets of the same size from a pooled null.", "", ground_truth_table(gt)]
        if method_subspaces(gt):
            parts += ["", SUBSPACE_NOTE, "", subspace_table(gt)]
    unmixing = anim / "unmixing.json"
    if unmixing.is_file():
        parts += ["", "Ways to unmix a span, and the other methods that may return non-orthogonal directions, on this "
                  "run's generators (`python -m bench.unmixing --run " + cfg.run + "`), scored by the same ground truth. "
                  "Each row's span ceiling is that of its own directions' span (k): joint diagonalisation and "
                  "ICA unmix the base's top 8, so theirs is the base's at 8; the steering walks take up to 6 + "
                  "content directions inside the base's top 12 or the whole latent, so theirs can fall below it; "
                  "the base row is judged on its top k = recoverable, a random span of 16 on all 16:",
                  "", unmixing_table(_read_json(unmixing)["rows"])]
    return "\n".join(parts) + "\n"


def unmixing_table(rows: list[dict]) -> str:
    """bench/unmixing.py's rows: per generator and variant, the counts, area, p, span ceiling and what the
    variant reports of itself (ICA's linearity, the joint diagonalisation's leftover off-diagonal share, the share
    of each edit the steering walks reproduce)."""
    def count(at):
        return "–" if not at else f"{at['0.5']} / {at['0.67']} / {at['0.8']}"

    out = []
    for r in rows:
        own = [f"{k.replace('_', ' ')} {r[k]:.2f}" for k in ("linearity", "off_diagonal") if r.get(k) is not None]
        own += ["FastICA did not converge"] if r.get("converged") is False else []
        own = ", ".join(own + ([_reproduced(r["reproduced"])] if r.get("reproduced") else []))
        out.append([r["generator"], r["variant"], count(r["recovered_at"]), f"{r['recoverable_at']['0.67']}",
                    "–" if r["auc"] is None else f"{r['auc']:.2f}", _p(r["p"]), str(r.get("k") or "–"),
                    count(r.get("span_ceiling_at")), own or "–"])
    return _table(["generator", "variant", "recovered at 0.5 / 2/3 / 0.8", "recoverable at 2/3", "area", "p", "k",
                   "span ceiling", "its own check"], out)


def _reproduced(shares: list[float]) -> str:
    """The steering walks' fit: the share of each edit (EDITS order) its walk reproduces."""
    from latentct.discover.unmix import EDITS

    return "edits reproduced: " + ", ".join(f"{e} {v:.2f}" for e, v in zip(EDITS, shares))


def mig_table(anim: Path, generators: list[str]) -> str:
    """MIG and DCI (Khrulkov et al.'s protocol) of every method, with the published Shapes3D MIG beside them."""
    rows = []
    for gen in generators:
        path = anim / f"{gen}_disentanglement" / "disentanglement.json"
        if not path.is_file():
            continue
        for r in _read_json(path)["methods"]:
            published = PUBLISHED_SHAPES3D_MIG.get(r["method"])
            shown = f"{published:.3f} ({PUBLISHED_NAMES[r['method']]})" if published is not None else "–"
            enc = r.get("encoder_r2")
            rows.append([gen, r["method"], "–" if enc is None else f"{enc:.2f}", f"{r['mig']:.3f}",
                         f"{r['dci_disentanglement']:.3f}", f"{r['dci_completeness']:.3f}",
                         f"{r['dci_informativeness']:.3f}", shown])
    return _table(["generator", "method", "code encoder R2", "MIG", "DCI disentanglement", "DCI completeness",
                   "DCI informativeness", "published Shapes3D MIG"], rows)


def budget_section(anim: Path, link: str = "Animations/examples") -> list[str]:
    path = anim / "budget.json"
    if not path.is_file():
        return []
    budget = _read_json(path)
    rows = [[r["generator"], r["method"], r["steps"], "–" if r["rca"] is None else f"{r['rca']:.2f}",
             f"{r['recovered']} of {r['recoverable']}", f"{r['effect_disentanglement']:.2f}"] for r in budget]
    devices = sorted({r.get("device", "not recorded") for r in budget})
    curves = []
    if (anim / "budget.png").is_file():
        curves = ["", f"![budget curves]({link}/{_to_examples(anim, anim / 'budget.png', 'budget.png')})"]
    return ["", f"A budget that converges (`python -m bench.budget --run {anim.name}`; run on: "
            f"{', '.join(devices)}):", *curves, "",
            _table(["generator", "method", "steps", "RCA", "recovered", "effect-D"], rows)]


def render_benchmark(cfg: Settings, link: str = "Animations/examples") -> str:
    """Every method on both generators (docs/results.md): the ground-truth tables, MIG and DCI, the budget curves."""
    root = Path(cfg.root)
    anim = root / "Animations" / cfg.run
    summary = _read_json(anim / "summary.json")
    parts = [f"*Generated by `python -m latentct.show.results --run {cfg.run} --block benchmark` from `python pipeline.py "
             f"--preset benchmark --run {cfg.run}` (wall time {_minutes(summary['wall_seconds'])} on the machine that "
             "ran it).*"]
    for gen, gt in _ground_truths(summary):
        parts += ["", f"**{gen}**, every method:", "", ground_truth_table(gt)]
        if method_subspaces(gt):
            parts += ["", SUBSPACE_NOTE, "", subspace_table(gt)]
    parts += ["", "MIG and DCI by Khrulkov et al.'s protocol (phantom slices with known factors; not comparable in "
              "absolute terms with Shapes3D, shown for the methods' order). The code encoder's R2 on held-out "
              "generated images says how far the codes can be read at all: where it is low, MIG and DCI measure the "
              "encoder, not the directions:", "",
              mig_table(anim, [r["name"] for r in summary["stages"] if r["stage"].startswith("train_")])]
    parts += budget_section(anim, link)
    return "\n".join(parts) + "\n"


def _generator_stage(summary: dict, name: str) -> dict | None:
    return next((r for r in summary["stages"] if r["name"] == name), None)


def render_diffusion(cfg: Settings, link: str = "Animations/examples") -> str:
    """The diffusion model's full tables (docs/results.md): its training, a sample grid, and each view's ground
    truth and subspace diagnostic."""
    root = Path(cfg.root)
    anim, runs = root / "Animations" / cfg.run, root / "runs" / cfg.run
    summary = _read_json(anim / "summary.json")
    trained = _generator_stage(summary, "diffusion")
    config = _read_json(runs / "diffusion" / "config.json")
    grid = runs / "diffusion" / "samples_latest.png"
    examples_dir = root / "Animations" / "examples"
    if grid.is_file():
        examples_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, examples_dir / "diffusion_samples.png")
    ae_step, unet_step = step_times(runs / "diffusion" / "metrics.jsonl")
    took = (f"median step {ae_step:.2f} s and {unet_step:.2f} s, so about "
            f"{_minutes(ae_step * config['autoencoder_steps'] + unet_step * config['steps'])} of steps; "
            if ae_step is not None and unet_step is not None else "")
    parts = [f"*Generated by `python -m latentct.show.results --run {cfg.run} --block diffusion` from `python "
             f"pipeline.py --preset benchmark-diffusion` (wall time {_minutes(summary['wall_seconds'])} on the machine "
             "that ran it, 2 CPU cores).*", "",
             f"Latent diffusion ({config['space']}): an AutoencoderKL (widths {config['ae_channels']}, "
             f"{config['latent_channels']} latent channels) trained for {config['autoencoder_steps']} steps, then the "
             f"UNet (widths {config['unet_channels']}) for {config['steps']} steps, batch {config['batch_size']} ("
             + took + (f"last evaluation {trained['metric']})." if trained else ")"), "",
             generator_table(runs, ["diffusion"])]
    if grid.is_file():
        parts += ["", f"Samples ({config['ddim_steps']} deterministic DDIM steps, lung window):", "",
                  f"![diffusion samples]({link}/diffusion_samples.png)"]
    for gen, gt in _ground_truths(summary):
        report = _read_json(anim / gen / "report.json")
        view = report.get("diffusion") or {}
        parts += ["", f"**{gen}** ({view.get('ddim_steps')} DDIM steps" + (f", t_edit {view.get('t_edit')}"
                  if view.get("view") == "h" else "") + "), every method:", "", ground_truth_table(gt)]
        if method_subspaces(gt):
            parts += ["", SUBSPACE_NOTE, "", subspace_table(gt)]
    return "\n".join(parts) + "\n"


def step_times(path: Path) -> tuple[float | None, float | None]:
    """Median seconds per step of a diffusion run's autoencoder and UNet phases, from its metrics.jsonl (the
    intervals a resumed run logged count like the others)."""
    import statistics

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    ae = [r["step_time"] for r in rows if "ae_loss" in r and "step_time" in r]
    unet = [r["step_time"] for r in rows if "loss" in r and "ae_loss" not in r and "step_time" in r]
    return (statistics.median(ae) if ae else None), (statistics.median(unet) if unet else None)


def best_label_free(gt: dict) -> tuple[str, dict] | None:
    """The label-free method with the most factors recovered at tau 2/3 (ties: the larger area), or None."""
    free = label_free(gt)
    if not free:
        return None
    name = max(free, key=lambda m: rank(free[m]))
    return name, free[name]


def diffusion_comparison(truths: list[tuple[str, dict]], others: list[tuple[str, dict]]) -> str:
    """Which view and which label-free method separate the anatomy best, and the GAN's and the VAE's best beside
    them, written from the tables."""
    def said(gen, gt):
        best = best_label_free(gt)
        sup = gt["methods"].get("supervised")
        ceiling = (f"the supervised directions recover {sup['recovered_at']['0.67']} of {len(gt['oracle_r2'])}"
                   if sup else "no ceiling")
        if best is None:
            return f"{gen}: no label-free method scored; {ceiling}"
        count, auc, p, word = headline(best[1])
        return f"{gen}: {best[0]}, {count} (area {auc}, p {p}, {word}); {ceiling}"

    if not truths:
        return "No diffusion view has a ground-truth table."

    def above(table):
        return str(table.get("verdict", "")).startswith("above null")

    def ceiling(gt):
        return (gt["methods"].get("supervised") or {"recovered_at": {"0.67": -1}})["recovered_at"]["0.67"]

    candidates = [(g, *best) for g, gt in truths if (best := best_label_free(gt)) is not None and above(best[1])]
    if candidates:
        gen, method, table = max(candidates, key=lambda c: (c[2]["recovered_at"]["0.67"] / max(ceiling(
            dict(truths)[c[0]]), 1), c[2].get("auc") or -1.0))
        lead = f"Best label-free separation of the anatomy above the null: the {gen} view with {method}."
    else:
        lead = ("No label-free method separates the anatomy above the null in either view (p of the area >= 0.05 "
                "against random directions of the same view).")
    held = max(truths, key=lambda x: ceiling(x[1]))
    text = (lead + f" The view whose latent holds the most factors linearly (the supervised ceiling at 2/3): "
            f"{held[0]}, {ceiling(held[1])} of {len(held[1]['oracle_r2'])}. Per view, the best label-free method "
            "(of what that view's ceiling recovers), then the ceiling: "
            + "; ".join(said(g, gt) for g, gt in truths) + ".")
    if others:
        text += (" The GAN and the VAE on the same phantom and image size (the compared run's tables when this "
                 "block was generated): "
                 + "; ".join(said(g, gt) for g, gt in others) + ".")
    return text


def readme_blocks(cfg: Settings, picked: list[tuple[str, str]] | None, docs_link: str) -> dict[str, str]:
    """The README's short blocks of this run kind: the demo's example GIF row and results at a glance; the
    benchmark's results at a glance and which label-free method to try first on each generator."""
    summary = _read_json(Path(cfg.root) / "Animations" / cfg.run / "summary.json")
    truths = _ground_truths(summary)
    command = f"python -m latentct.show.results --run {cfg.run}" + (" --block benchmark" if cfg.block == "benchmark" else "")
    note = (f"*Generated by `{command}` from the galleries' `report.json`; every table in full in "
            f"[{docs_link}]({docs_link}).*")
    if cfg.block == "benchmark":
        return {"benchmark": "\n".join([note, "", glance_table(truths), "", *(first_choice(gen, gt) + "\n"
                                                                        for gen, gt in truths)])}
    if cfg.block == "diffusion":
        other = Path(cfg.root) / "Animations" / (cfg.compare_run or "") / "summary.json"
        others = _ground_truths(_read_json(other)) if cfg.compare_run and other.is_file() else []
        note = note.replace(f"--run {cfg.run}", f"--run {cfg.run} --block diffusion")
        return {"diffusion": "\n".join([note, "", glance_table(truths), "", diffusion_comparison(truths, others)])
                + "\n"}
    made = made_by(summary)
    first = made.get("first_gallery_seconds")
    record = machine_record(summary, truths, Path(cfg.root))
    across = machines_line(record, Path(cfg.root) / cfg.machines) if cfg.machines else []
    blocks = {"results": "\n".join([note, "", glance_table(truths), *spread_line(Path(cfg.root) / "Animations" /
                                                                                 cfg.run), *across]) + "\n",
              "runtime": f"The main job took {_minutes(made['wall_seconds'])} on the machine that last ran it (2 CPU "
                         "cores" + (f"; the first gallery was on disk after {_minutes(first)}" if first else "")
                         + ")" + (f"; {sum(not r['cached'] for r in summary['stages'])} of its stages were run again "
                                  f"later, in {_minutes(summary['wall_seconds'])}" if made is not summary else "")
                         + "; nothing is downloaded.\n"}
    if picked:
        blocks["examples"] = examples_row(picked, "Animations/examples") + "\n"
    return blocks


HEADLINE_FIELDS = ("recovered_at", "recoverable", "auc", "p_value", "verdict", "supervision")


def machine_record(summary: dict, truths: list[tuple[str, dict]], root: Path) -> dict:
    """A run's headline in a file of its own: per generator its recoverable counts and per method the headline
    fields, with the machine, the commit and the run's settings, so that another machine's run can be set
    beside it."""
    import datetime

    from latentct.generators.interface import file_hash

    made = made_by(summary)
    written = Path(root) / "Animations" / summary["run"] / "summary.json"  # older runs: the file's time
    date = made["written"][:10] if made.get("written") else (
        datetime.datetime.fromtimestamp(written.stat().st_mtime, datetime.timezone.utc).date().isoformat()
        if written.is_file() else None)
    files = {Path(r["output"]).name: _read_json(Path(r["output"]) / "report.json").get("generator")
             for r in summary["stages"] if r["stage"] == "evaluate"}  # each gallery's generator file
    return {"run": summary["run"], "settings": summary.get("settings"), "date": date,
            "machine": made.get("machine") or f"{machine_name()} (where the tables were made)",
            "commit": made.get("commit") or code_version(root), "wall_seconds": made.get("wall_seconds"),
            "weights": {gen: file_hash(files[gen]) if files.get(gen) and Path(files[gen]).is_file() else None
                        for gen, _ in truths},
            "generators": {gen: {"recoverable_at": gt.get("recoverable_at"),
                                 "methods": {m: {k: t.get(k) for k in HEADLINE_FIELDS}
                                             for m, t in gt["methods"].items()}}
                           for gen, gt in truths}}


def _same_run(a: dict, b: dict) -> bool:
    """Whether two records are of one run (recorded again, rescored, or rerun from a later stage): the same
    generators, by their files' sha256; records without them (transcribed) compare their headlines."""
    wa, wb = a.get("weights") or {}, b.get("weights") or {}
    if wa and wb and all(wa.values()) and all(wb.values()):
        return wa == wb
    return a.get("generators") == b.get("generators")


def machines_line(record: dict, folder: Path) -> list[str]:
    """How the headline moved between this run and the recorded runs of the same settings on other machines
    (bench/machines/*.json): per generator the recoverable count's range, the method rows whose count at tau 2/3
    differs, and the verdicts that flip, with the p-values' range."""
    others = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() and record.get("settings") else []:
        other = json.loads(path.read_text())
        if (other.get("settings") and _what_runs(other["settings"]) == _what_runs(record["settings"])
                and other.get("generators") and not _same_run(other, record)):
            others.append(other)
    if not others:
        return []
    runs = [record, *others]
    moved, flips, recoverable = [], [], []
    left_out = []
    for gen, table in record["generators"].items():
        if not all(gen in r["generators"] for r in runs):
            left_out.append(gen)
            continue
        counts = [(r["generators"][gen].get("recoverable_at") or {}).get("0.67") for r in runs]
        if None not in counts:  # no supervised row, no recoverable count
            recoverable.append(f"{gen} {_range(counts)}")
        for method in table["methods"]:
            rows = [r["generators"][gen]["methods"].get(method) for r in runs]
            if any(row is None or not row.get("recovered_at") for row in rows):
                left_out.append(f"{gen} {method}")
                continue
            at = [row["recovered_at"]["0.67"] for row in rows]
            if len(set(at)) > 1:
                moved.append(f"{gen} {method} {_range(at)}")
            if len({str(row["verdict"]).startswith("above") for row in rows}) > 1:
                p = [row["p_value"]["auc"] for row in rows if (row.get("p_value") or {}).get("auc") is not None]
                flips.append(f"{gen} {method}" + (f" (p {min(p):.3f}-{max(p):.3f})" if p else ""))
    def where(r):
        return f"{r.get('machine') or 'machine not recorded'}, {r.get('commit') or 'commit unknown'}"

    weights = [r.get("weights") or {} for r in runs]
    if all(w.get(gen) for w in weights for gen in record["generators"]):
        told = "Generator weights (sha256): " + ", ".join(
            f"{gen} {'the same in every run' if len({w[gen] for w in weights}) == 1 else 'differ'}"
            for gen in record["generators"])
    else:
        told = "Not every run recorded its generators' weights"
    return ["", f"Across runs: this run ({where(record)}) beside {len(others)} other recorded "
            f"run{'s' if len(others) > 1 else ''} of the same seed and settings in `bench/machines/` ("
            + "; ".join(map(where, others)) + f"). {told}. Recoverable at 2/3: "
            + (", ".join(recoverable) or "not scored") + ". Counts at 2/3 that differ: "
            + (", ".join(moved) if moved else "none") + ". Verdicts that flip between above and not above the null: "
            + (", ".join(flips) if flips else "none") + "."
            + (f" Not in every run, so not compared: {', '.join(left_out)}." if left_out else "")]


RUN_CONTROL = ("root", "workers", "parallel", "device", "from_stage")  # how a run is driven, not what it computes


def _what_runs(settings: dict | None) -> dict | None:
    return None if settings is None else {k: v for k, v in settings.items() if k not in RUN_CONTROL}


def _range(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def spread_line(anim: Path) -> list[str]:
    """How far the counts moved when the run's ground truth was repeated (python -m bench.stability), if it was."""
    path = anim / "stability.json"
    if not path.is_file():
        return []
    stability = _read_json(path)
    rows = stability["rows"]
    runs = sorted({(r["seed"], r["threads"]) for r in rows})
    seeds, threads = sorted({s for s, _ in runs}), sorted({n for _, n in runs})
    flips = []  # above the null in some repeats and not in others, with the p-values' range
    for key in dict.fromkeys((r["generator"], r["method"]) for r in rows):
        repeats = [r for r in rows if (r["generator"], r["method"]) == key and r["p"] is not None]  # a null
        if len({r["verdict"].startswith("above") for r in repeats}) > 1:
            p = [r["p"] for r in repeats]
            flips.append(f"{' '.join(key)} (p {min(p):.3f}-{max(p):.3f}"
                         + (", borderline in every repeat)" if all(0.01 <= v <= 0.2 for v in p) else ")"))
    return ["", f"Spread: the ground truth repeated with {' and '.join(map(str, threads))} threads and report-latent "
            f"seeds {' and '.join(map(str, seeds))} (`python -m bench.stability --run {anim.name}`): no count moved "
            f"by more than {max(stability['largest_move'].values())}; verdicts that flipped between above and not "
            "above the null: " + (", ".join(flips) if flips else "none") + "."]


def markers(name: str) -> tuple[str, str]:
    """The two lines a generated block sits between, in the README and in docs/results.md."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(text: str, block: str, source: str = "README", name: str = "results") -> str:
    begin, end = markers(name)
    if begin not in text or end not in text:
        raise UserError(f"{source}: no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"


def _write(path: str | None, blocks: dict[str, str], run: str) -> None:
    """Replace each named block in the file at ``path``, or print the blocks where it is None."""
    if path is None:
        for name, text in blocks.items():
            begin, end = markers(name)
            print(f"{begin}\n{text}{end}")
        return
    target = Path(path)
    if not target.is_file():
        raise UserError(f"{target}: missing; it must hold the blocks " + ", ".join(markers(n)[0] for n in blocks))
    text = target.read_text()
    for name, block in blocks.items():
        text = replace_block(text, block, str(target), name)
    atomic_write_text(target, text)
    print(f"{target}: {', '.join(blocks)} block{'s' if len(blocks) > 1 else ''} replaced from Animations/{run}")


def main(cfg: Settings) -> dict[str, dict[str, str]]:
    """Full tables into --docs, short blocks into --readme; returns both as {"docs": {...}, "readme": {...}}."""
    root = Path(cfg.root)
    link, docs_link = "Animations/examples", "docs/results.md"
    if cfg.docs:
        link = Path(os.path.relpath(root / "Animations" / "examples", Path(cfg.docs).parent)).as_posix()
    if cfg.docs and cfg.readme:
        docs_link = Path(os.path.relpath(cfg.docs, Path(cfg.readme).parent)).as_posix()
    if cfg.block == "results":
        summary = _read_json(root / "Animations" / cfg.run / "summary.json")
        galleries = [r for r in summary["stages"] if r["stage"] == "evaluate"]
        picked = examples(root / "Animations" / cfg.run, galleries, cfg.examples) if cfg.examples else None
        full = render(cfg, link, picked)
    elif cfg.block == "diffusion":
        picked, full = None, render_diffusion(cfg, link)
    else:
        picked, full = None, render_benchmark(cfg, link)
    out = {"docs": {cfg.block: full}, "readme": readme_blocks(cfg, picked, docs_link)}
    if cfg.record:
        summary = _read_json(root / "Animations" / cfg.run / "summary.json")
        Path(cfg.record).parent.mkdir(parents=True, exist_ok=True)
        record = machine_record(summary, _ground_truths(summary), root)
        atomic_write_json(Path(cfg.record), record)
        print(f"{cfg.record}: this run's headline, {record['machine']}")
    _write(cfg.docs, out["docs"], cfg.run)
    _write(cfg.readme, out["readme"], cfg.run)
    return out


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.show.results")
