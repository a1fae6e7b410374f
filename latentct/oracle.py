"""The factor oracle as a pipeline stage: train the CNN that reads the phantom's six factors off a slice once,
before anything scores directions with it.

    python -m latentct.oracle --dataset data/demo/slices_64 --output runs/demo/oracle

Writes ``factor_regressor.pt`` (weights, normalisation, held-out R2 per factor, the data's hash and window)
and ``config.json`` into the output folder; EvalDirections reads it through ``--regressor``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentct.data import parse_window
from latentct.factors import save_regressor, train_regressor
from latentct.settings import check, run_cli, save_settings, setting


@dataclass
class Settings:
    """Train the factor oracle for a preprocessed phantom dataset."""

    dataset: str = setting("data/demo/slices_64", "preprocessed phantom dataset (its index has the factors)")
    output: str = setting("runs/demo/oracle", "folder for factor_regressor.pt")
    window: str = setting("default", "the HU window of the generators it will read (their training window)")
    steps: int = setting(600, "training steps")
    slices: int = setting(3000, "freshly rendered phantom slices added to the dataset's train split")
    seed: int = setting(0, "seed")

    def __post_init__(self):
        check(self.steps >= 1, "steps", "must be at least 1")
        check(self.slices >= 0, "slices", "must not be negative")
        parse_window(self.window)


def main(cfg: Settings) -> dict:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_settings(cfg, out / "config.json")
    torch.manual_seed(cfg.seed)
    state = train_regressor(cfg.dataset, parse_window(cfg.window), steps=cfg.steps, seed=cfg.seed,
                            synthetic=cfg.slices)
    save_regressor(state, out / "factor_regressor.pt")
    print("factor oracle, held-out R2: " + ", ".join(f"{f} {v:.2f}" for f, v in state["test_r2"].items()))
    return state["test_r2"]


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.oracle")
