"""A budget that converges: each trained discovery method, one run per generator, scored at growing step counts.

    python -m bench.budget --run benchmark [--checkpoints 300 1000 3000 10000] [--methods learned latentclr disco]

Reads a finished pipeline run (``python pipeline.py --preset benchmark --run benchmark``): its generators, its
oracle, its known-answer validation (the noise floors) and its supervised ceiling (what is recoverable). Each
method trains once per generator, resuming from its own checkpoint up to each step count; at each one the
directions are scored like every table's (RCA: the learned method's own; DisCo and LatentCLR: a fresh
reconstructor on the frozen directions, as their pipeline rows; recovered of recoverable and effect-DCI through
the oracle). Writes ``Animations/<run>/budget.json`` and ``budget.png`` (the curves). Outside CI: hours on 2 cores.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import EvalDirections
from latentct.util.io import atomic_path, atomic_write_json
from latentct.util.settings import make_settings, parse_settings, setting
from Training import TrainDirections, TrainDisCo, TrainLatentCLR

TRAINERS = {"learned": TrainDirections, "disco": TrainDisCo, "latentclr": TrainLatentCLR}


@dataclass
class Settings:
    """Score the trained methods at growing step budgets."""

    run: str = setting("benchmark", "the pipeline run to read (runs/<run>/, Animations/<run>/)")
    root: str = setting(".", "folder that holds runs/ and Animations/")
    checkpoints: list[int] = setting([300, 1000, 3000, 10000], "step counts at which each method is scored")
    methods: list[str] = setting(["learned", "latentclr", "disco"], "the trained methods")
    generators: list[str] = setting(["dcgan", "vae"], "the generators")
    disco_max_steps: int = setting(3000, "DisCo's largest budget (its step costs about 30 Voynov steps on CPU)")
    rca_steps: int = setting(300, "steps of the fresh reconstructor that measures DisCo's and LatentCLR's RCA")
    device: str = setting("auto", "the trainers' --device")
    compile: str = setting("off", "the trainers' --compile (off: each budget restarts its trainer, and "
                           "compiling it again each time costs more than it saves)", choices=("auto", "on", "off"))


def score(cfg: Settings, gen: str, directions: Path, out: Path) -> dict:
    """RCA, recovered of recoverable and effect-DCI of one directions file, as the pipeline's tables have them."""
    runs, anim = Path(cfg.root) / "runs" / cfg.run, Path(cfg.root) / "Animations" / cfg.run
    oracle = next((Path(cfg.root) / "runs" / "oracle").glob("64px_*/oracle.pt"))
    validation = anim / "validation" / "validation.json"
    floors = json.loads(validation.read_text())  # scored at the run's own design: its floors' samples and shifts
    report = EvalDirections.main(make_settings(EvalDirections.Settings, dict(
        report_samples=floors["samples"], report_shifts=floors["frames"],
        directions=str(directions), output=str(out), compare=[str(runs / f"{gen}_supervised" / "directions.pt")],
        oracle=str(oracle), validation=str(validation),
        null_cache=str(anim / f"{gen}_null_pool.pt"), real_slices=0, frames=5, ground_truth="auto")))
    gt = report["ground_truth"]
    main = gt["main"]
    return {"rca": report["rca"], "recovered": main["recovered"], "recovered_at": main["recovered_at"],
            "recoverable": gt["recoverable"], "auc": main["auc"], "p_value": main["p_value"],
            "effect_disentanglement": main["effect_dci"]["disentanglement"],
            "effect_completeness": main["effect_dci"]["completeness"]}


def train_to(method: str, gen: str, steps: int, out: Path, cfg: Settings) -> Path:
    """Train (resuming) to ``steps``; the directions file whose RCA is measured like the pipeline's rows."""
    runs = Path(cfg.root) / "runs" / cfg.run
    generator = str(runs / gen / "generator.pt")
    module = TRAINERS[method]
    common = ["--device", cfg.device, "--compile", cfg.compile]
    args = ["--preset", "demo", "--generator", generator, "--output", str(out), "--steps", str(steps),
            "--checkpoint-every", str(steps), *common]
    if method == "learned":
        args += ["--batch-size", "48", "--eval-every", str(steps)]
    if method == "latentclr":  # the reference's learning-rate drops (the demo preset compresses them into 300 steps)
        args += ["--milestones", "1000", "5000"]
    module.main(parse_settings(module.Settings, args, presets=module.PRESETS))
    if method == "learned":
        return out / "directions.pt"
    measured = out.with_name(out.name + f"_rca{steps}")
    shutil.rmtree(measured, ignore_errors=True)
    TrainDirections.main(parse_settings(TrainDirections.Settings, [
        "--preset", "demo", "--generator", generator, "--output", str(measured), "--method", "file",
        "--directions-file", str(out / "directions.pt"), "--steps", str(cfg.rca_steps), "--batch-size", "48",
        *common],
        presets=TrainDirections.PRESETS))
    return measured / "directions.pt"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for (gen, method) in dict.fromkeys((r["generator"], r["method"]) for r in rows):
        pts = [r for r in rows if r["generator"] == gen and r["method"] == method]
        steps = [r["steps"] for r in pts]
        for ax, key in zip(axes, ("rca", "recovered", "effect_disentanglement")):
            ax.plot(steps, [r[key] for r in pts], marker="o", label=f"{gen} {method}")
    for ax, title in zip(axes, ("RCA", "factors recovered", "effect-disentanglement")):
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def device_name(device: str) -> str:
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.cuda.get_device_name() if cuda else "CPU"


def main(cfg: Settings) -> list[dict]:
    anim = Path(cfg.root) / "Animations" / cfg.run
    folder = Path(cfg.root) / "runs" / cfg.run / "budget"
    rows = []
    for gen in cfg.generators:
        for method in cfg.methods:
            for steps in sorted(cfg.checkpoints):
                if method == "disco" and steps > cfg.disco_max_steps:
                    continue
                files = train_to(method, gen, steps, folder / f"{gen}_{method}", cfg)
                rows.append({"generator": gen, "method": method, "steps": steps, "device": device_name(cfg.device),
                             **score(cfg, gen, files, folder / f"{gen}_{method}_eval{steps}")})
                print(json.dumps(rows[-1]))
                atomic_write_json(anim / "budget.json", rows)
                plot(rows, anim / "budget.png")
    return rows


if __name__ == "__main__":
    main(parse_settings(Settings))
