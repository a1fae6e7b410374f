"""index.html: every GIF with its label and numbers (sortable), the effect heat map, the baselines table,
samples and real-slice edits. Static files only; it opens from disk."""
from __future__ import annotations

import html
import json
from pathlib import Path

from latentct.show.results import labels_ok
from latentct.util.io import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#111;color:#ddd}
h1,h2{font-weight:600} a{color:#8cf} table{border-collapse:collapse;margin:8px 0 24px}
th,td{border-bottom:1px solid #333;padding:4px 8px;text-align:left;font-size:13px;vertical-align:middle}
th.sortable{cursor:pointer;color:#8cf} img.gif{width:128px;image-rendering:pixelated}
img.wide{max-width:100%;image-rendering:pixelated} .note{color:#999;font-size:13px} .ok{color:#7d7} .no{color:#d77}
"""

SCRIPT = """
function sortBy(col){const t=document.getElementById('directions');const rows=[...t.tBodies[0].rows];
const dir=t.dataset.sortCol==col&&t.dataset.sortDir=='desc'?'asc':'desc';t.dataset.sortCol=col;t.dataset.sortDir=dir;
rows.sort((a,b)=>{const x=parseFloat(a.dataset[col]),y=parseFloat(b.dataset[col]);return dir=='desc'?y-x:x-y});
rows.forEach(r=>t.tBodies[0].appendChild(r));}
window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.imagesOk=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
document.body.dataset.imagesBroken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;});
"""


def _esc(text) -> str:
    return html.escape(str(text))


def _fmt(value, digits=2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and value is not None else "–"


def diffusion_view_line(view: dict) -> str:
    """How a diffusion generator's images were made: which latent the directions move, and the sampler."""
    steps = f"{view['ddim_steps']} deterministic DDIM steps from fixed starting noise"
    if view["view"] == "h":
        return (f"Diffusion model, h view: directions add an offset to the UNet's middle-block output at every step "
                f"with t >= {view['t_edit']} (Asyrp's edit window); {steps}.")
    return f"Diffusion model, noise view: directions move the starting noise x_T; {steps}."


def write_gallery(folder: Path, report: dict) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>LatentCT: {_esc(report['name'])}</title>",
             f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>",
             f"<h1>What the latent directions do: {_esc(report['name'])}</h1>",
             f"<p class='note'>Generator <code>{_esc(report['generator'])}</code> ({_esc(report['generator_kind'])}); "
             f"directions <code>{_esc(report['directions_file'])}</code> ({_esc(report['method'])}, "
             f"K = {report['directions_count']}, RCA {_fmt(report.get('rca'))}). Shifts in [-{report['shift_scale']}, "
             f"{report['shift_scale']}] (the directions' own scale); the strip under each GIF shows the shift and "
             f"lights up at 0. " + (f"Pictures in the HU window {report['display_window']}." if report.get("window")
                                      else "No HU window declared: pictures show the generator's output range as "
                                      "black to white.") + "</p>"]
    if report.get("spacing_note"):
        parts.append(f"<p class='note no'>Units: {_esc(report['spacing_note'])}.</p>")
    if report.get("volume"):
        parts.append("<p class='note'>A 3D generator: every picture shows the axial, coronal and sagittal mid-planes "
                     "side by side; the anatomy is measured on the axial mid-plane.</p>")
    if report.get("anatomy", "measured") != "measured" and not report.get("volume"):
        parts.append(f"<p class='note no'>Anatomy {_esc(report['anatomy'])}.</p>")
    if report.get("generator_note"):
        parts.append(f"<p class='note'>Generator: {_esc(report['generator_note'])}.</p>")
    if report.get("diffusion"):
        parts.append(f"<p class='note'>{_esc(diffusion_view_line(report['diffusion']))}</p>")
    rows_by_k = {r["direction"]: r for r in report["directions"]}
    if report.get("axes"):
        parts.append(f"<h2>{len(report['axes'])} distinct effects, strongest first</h2><p class='note'>Directions whose "
                     "signed effects on the anatomy measurements point the same way (|cosine| &ge; 0.9, v and -v "
                     "alike) are one axis, shown once; the full list follows.</p><table id='axes'><tbody>")
        for axis in report["axes"]:
            lead = rows_by_k[axis["leader"]]
            others = [k for k in axis["members"] if k != axis["leader"]]
            parts.append(f"<tr class='axis'><td><img class='gif' src='{_esc(lead['gif'])}' alt='axis {axis['leader']}'>"
                         f"</td><td>{_esc(axis['label'])}<br><span class='note'>k = {axis['leader']}"
                         + (f"; also k = {', '.join(map(str, others))}" if others else "") + "</span></td></tr>")
        parts.append("</tbody></table>")
    parts.append("<h2>Directions</h2><p class='note'>Click a blue header to sort. <i>effect</i>: change over the "
                 "whole shift range in units of the natural spread between samples, times R2. <i>realistic "
                 "up to</i>: the largest shift whose frames stay within 1.1 x the sliced Wasserstein distance of "
                 "real slices to each other (or of the unshifted frames, when larger): beyond it the sweep leaves "
                 "the data.</p>")
    gt = report.get("ground_truth")
    factor_of = matched_factors(gt)
    parts.append("<table id='directions'><thead><tr><th class='sortable' onclick=\"sortBy('k')\">k</th><th>sweep</th>"
                 "<th>what it does</th><th class='sortable' onclick=\"sortBy('score')\">effect</th>"
                 "<th class='sortable' onclick=\"sortBy('r2')\">R2</th>"
                 "<th class='sortable' onclick=\"sortBy('dis')\">disentanglement</th>"
                 "<th class='sortable' onclick=\"sortBy('change')\">image change</th><th>realistic up to</th>"
                 "<th>matched factor</th></tr></thead><tbody>")
    for row in report["directions"]:
        k = row["direction"]
        r2 = row["r2"][row["dominant"]]
        parts.append(
            f"<tr class='direction' data-k='{k}' data-score='{row['score']:.6f}' data-r2='{r2:.6f}' "
            f"data-dis='{row['disentanglement']:.6f}' data-change='{row['image_change']:.6f}'><td>{k}</td>"
            f"<td><img class='gif' src='{_esc(row['gif'])}' alt='direction {k}'></td><td>{_esc(row['label'])}</td>"
            f"<td>{row['score']:.2f}</td><td>{r2:.2f}</td><td>{row['disentanglement']:.2f}</td>"
            f"<td>{row['image_change']:.3f}</td><td>{_realistic(row)}</td><td>{factor_of.get(k, '')}</td></tr>")
    parts.append("</tbody></table>")
    if gt:
        parts += ground_truth_section(gt)
    parts += label_section(report.get("label_subspace"))
    parts.append("<h2>Groups of ten directions</h2><p class='note'>Rows: directions; columns: different samples.</p>")
    for group in report["groups"]:
        parts.append(f"<p>{_esc(group['title'])}</p><img class='wide' src='{_esc(group['gif'])}' alt='{_esc(group['title'])}'>"
                     f" <img class='wide' src='{_esc(group['chart'])}' alt='chart {_esc(group['title'])}'>")
    if report.get("real"):
        parts.append("<h2>Real slices moved along directions</h2>")
        for item in report["real"]:
            parts.append(f"<p>{_esc(item['title'])}: reconstruction MSE {item['mse']:.4f} (mean |error| "
                         f"{item['mae_hu']:.0f} HU). Left: the slice and its reconstruction; right: the sweep along "
                         f"directions {', '.join(map(str, item['directions']))}.</p>"
                         f"<img class='wide' src='{_esc(item['pair'])}' alt='real slice'> "
                         f"<img class='wide' src='{_esc(item['gif'])}' alt='real slice sweep'>")
    parts.append(f"<h2>Generator samples</h2><img class='wide' src='{_esc(report['samples'])}' alt='samples'>")
    parts.append(f"<script type='application/json' id='report'>{_esc(json.dumps(report['summary']))}</script>")
    parts.append("</body></html>")
    path = folder / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def _realistic(row: dict) -> str:
    item = row.get("realism")
    return "–" if not item else f"&plusmn;{item['realistic_up_to']:.1f}"


def matched_factors(gt: dict | None) -> dict[int, str]:
    """Per direction, the factor cell of the directions table at the headline tau: the factor it stands for, a
    factor another direction stands for ("also"), or its largest share. A direction that passed is never called
    unclean, and none is presented as a factor it does not mainly move."""
    from latentct.score.scoring import direction_mark

    main = (gt or {}).get("main") or {}
    return {row["direction"]: f"<span class='{'ok' if 'stands_for' in row or 'also_for' in row else 'no'}'>"
            f"{_esc(direction_mark(row))}</span>" for row in main.get("directions", [])}


def _recovered_cell(table: dict) -> str:
    of = f" of {table['recoverable']} recoverable" if table.get("recoverable") is not None else " / 6"
    p = table.get("p_value") or {}
    sig = "" if not p else (f"; area {_fmt(table.get('auc'))}, p {_fmt(p.get('auc'), 3)}: "
                            f"<span class='{'ok' if table.get('above_null') else 'no'}'>{_esc(table['verdict'])}</span>")
    return f"{table['recovered']}{of}{sig}"


def ground_truth_section(gt: dict) -> list[str]:
    """The phantom's ground truth: how far to trust it, then every method against the supervised ceiling and
    the pooled random null, with effect-DCI."""
    from latentct.show.results import shown

    parts = ["<h2>Ground truth on the phantom</h2>", "<h3>How far to trust these numbers</h3>"]
    oracle = ", ".join(f"{_esc(f)} {v:.3f}" for f, v in gt["oracle_r2"].items())
    oracles = gt.get("oracles") or {}
    parts.append(f"<p class='note'>Score oracle <code>{_esc(gt.get('oracle_path'))}</code> (sha256 "
                 f"{_esc((oracles.get('score') or '')[:16])}); held-out R2 on fresh phantom slices: {oracle}. "
                 f"The supervised ceiling was fitted with the oracle sha256 {_esc((oracles.get('fit') or '?')[:16])}."
                 "</p>")
    val = gt.get("validation")
    if val:
        c = val["checks"]
        generated = ", ".join(f"{_esc(f)} {v['r2_generated']:.2f}" for f, v in val.get("oracle", {}).items()
                              if v.get("r2_generated") is not None)
        parts.append(f"<p class='note'>Known-answer sweeps (seed {val.get('seed')}): {c['attributed']}/6 single-factor "
                     f"sweeps attributed to their own factor, {c['leakage_ok']}/6 with leakage &le; 0.15, "
                     f"{_esc(labels_ok(c))}, {c['pairs_ok']}/{c['pairs']} "
                     f"two-factor sweeps with their two factors on top. "
                     + (f"The oracle on VAE reconstructions of held-out slices: R2 {generated}. " if generated else "")
                     + "</p>")
    minimum = gt.get("minimum_effect") or {}
    smallest = ", ".join(f"{_esc(f)} {v['value']:.3g} {_esc(v['unit'])}" for f, v in minimum.items())
    attainable = ((gt.get("attainable") or {}).get("vae")) or {}
    parts.append(f"<p class='note'>A factor counts as recovered at tau when a direction's effect on it, above the "
                 f"factor's noise floor (what the oracle reports for a factor that did not move), is more than tau of "
                 f"the direction's whole effect above the floors, at least twice the floor ({smallest}), with a line "
                 f"R2 of at least {gt['r2_min']}. The headline is tau = 2/3; <i>area</i>: the mean count over tau in "
                 "[0.5, 1] relative to the supervised directions'; p: the share of random direction sets of the "
                 f"same size, drawn from a pool of {(gt.get('null') or {}).get('pool', '–')} scored on the same latents, "
                 "that do at least as well."
                 + (" A perfectly clean change keeps a median share of "
                    + ", ".join(f"{_esc(f)} {v:.2f}" for f, v in attainable.items()) + " through the VAE." if attainable
                    else "")
                 + " <i>Effect-D/C</i>: DCI's disentanglement and completeness computed on the direction &times; factor"
                 " effect matrix minus the noise floors (not Eastwood &amp; Williams' predictive DCI).</p>")
    parts.append(f"<img class='wide' src='{_esc(gt['heatmap'])}' alt='direction by factor effect'> "
                 f"<img class='wide' src='{_esc(gt['curve'])}' alt='recovered factors against tau'>")
    factors = list(gt["oracle_r2"])
    parts.append("<table id='methods'><thead><tr><th>method</th><th>RCA</th><th>recovered at 0.5 / 2/3 / 0.8</th>"
                 "<th>at tau 2/3 (of recoverable); significance</th><th>effect-D</th><th>effect-C</th>"
                 + "".join(f"<th>{_esc(f)}</th>" for f in factors) + "</tr></thead><tbody>")
    for method, table in gt["methods"].items():
        found = {m["factor"]: m for m in table["matches"]["0.67"]}
        cells = "".join(f"<td class='ok'>k={found[f]['direction']}, share {found[f]['share']:.2f}</td>"
                        if f in found else "<td>–</td>" for f in factors)
        dci, at = table["effect_dci"], table["recovered_at"]
        parts.append(f"<tr class='method'><td>{_esc(shown(method, table))}</td><td>{_fmt(table.get('rca'))}</td>"
                     f"<td>{at['0.5']} / {at['0.67']} / {at['0.8']}</td><td>{_recovered_cell(table)}</td>"
                     f"<td>{dci['disentanglement']:.2f}</td><td>{dci['completeness']:.2f}</td>{cells}</tr>")
    parts.append("</tbody></table>")
    parts += subspace_section(gt)
    sup = (gt["methods"].get("supervised") or {}).get("supervised")
    if sup:
        parts.append("<p class='note'>Supervised ceiling (a linear fit F ~ B z + c of the fit oracle's readings of "
                     "G(z) on latents the scorer never draws; each direction moves its factor and holds the others): "
                     "fit R2 on held-out latents " + ", ".join(f"{_esc(f)} {v:.2f}" for f, v in sup["fit_r2"].items())
                     + f"; condition number of B {sup['condition_number']:.1f}.</p>")
    return parts


def subspace_section(gt: dict) -> list[str]:
    """Right subspace, wrong basis? latentct/score/subspace.py's diagnostic for every method that has one."""
    from latentct.show.results import SUBSPACE_NOTE, method_subspaces

    return _subspace_table("Subspace", SUBSPACE_NOTE, method_subspaces(gt), list(gt["oracle_r2"]), "span ceiling at "
                           "0.5 / 2/3 / 0.8")


def label_section(entry: dict | None) -> list[str]:
    """Every method's span against the directions fitted to the dataset's own label columns."""
    if not entry or not entry.get("methods"):
        return []
    fit = ", ".join(f"{_esc(c)} {v:.2f}" for c, v in entry["fit_r2"].items())
    note = (f"Directions fitted to the dataset's label columns from {entry['slices']} real slices encoded into the "
            f"latent ({_esc(entry['encoder'])}), each moving its column and holding the others; held-out R2 of the "
            f"fit: {fit}. Each method's span (the top k of a ranked method, all directions of the others) against "
            "them: principal angles and the share of each label direction inside the span (chance beside it).")
    if entry.get("supervised_angles_deg"):
        angles = entry["supervised_angles_deg"]
        note += (f" Against the oracle's supervised directions the label directions' span lies at {angles[0]:.0f}-"
                 f"{angles[-1]:.0f}°.")
    return _subspace_table("Against the dataset's labels", note, entry["methods"], entry["columns"], None, raw=True)


def _subspace_table(title: str, note: str, entries: dict, columns: list[str], ceiling: str | None,
                    raw: bool = False) -> list[str]:
    from latentct.show.results import subspace_rows

    rows = subspace_rows(entries)
    if not rows:
        return []
    both = " (latent / image)" if any(e.get("image") for e in entries.values()) else ""
    head = ["method", "k", f"principal angles{both}", *(f"{c} in span{both}" for c in columns), f"chance{both}"] + (
        [ceiling] if ceiling else [])
    body = [row if ceiling else row[:-1] for row in rows]
    return [f"<h3>{_esc(title)}</h3><p class='note'>{note if raw else _esc(note)}</p>",
            "<table class='subspace'><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>", *("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in body),
            "</tbody></table>"]


def write_index(folder: Path, summary: dict) -> Path:
    """Animations/<run>/index.html: a link to every finished gallery and the stages so far; rewritten after each
    stage, so the first gallery is linked while the rest still runs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>LatentCT run {_esc(summary['run'])}</title>",
             f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>",
             f"<h1>LatentCT run: {_esc(summary['run'])}</h1><h2>Galleries</h2><ul>"]
    for row in summary["stages"]:
        if row["stage"] == "evaluate":
            rel = Path(row["output"]).name + "/index.html"
            parts.append(f"<li><a href='{_esc(rel)}'>{_esc(Path(row['output']).name)}</a>: {_esc(row['metric'])}</li>")
    parts.append("</ul>")
    if summary.get("pending"):
        parts.append(f"<p class='note'>Still running or waiting: {_esc(', '.join(summary['pending']))}. "
                     "Reload to see them.</p>")
    parts.append("<h2>Stages</h2><table><thead><tr><th>stage</th><th>run</th><th>seconds</th><th>done at (s)</th>"
                 "<th>key figure</th></tr></thead><tbody>")
    for row in summary["stages"]:
        seconds = "cached" if row["cached"] else f"{row['seconds']:.0f}"
        parts.append(f"<tr><td>{_esc(row['stage'])}</td><td>{_esc(row['name'])}</td><td>{seconds}</td>"
                     f"<td>{row.get('finished_at', 0):.0f}</td><td>{_esc(row['metric'])}</td></tr>")
    parts.append(f"</tbody></table><p class='note'>Wall time so far {summary.get('wall_seconds', 0):.0f} s "
                 f"(the stages' own times add up to {summary['total_seconds']:.0f} s; some run side by side).</p>"
                 "</body></html>")
    path = folder / "index.html"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts))
    return path
