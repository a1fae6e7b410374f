"""The run folder of a training script: config.json, metrics.jsonl (which resumes cleanly), checkpoint.pt,
loss plots and optional TensorBoard logs. Only rank 0 writes."""
from __future__ import annotations

import json
from pathlib import Path

from latentct.train.runtime import Runtime
from latentct.util.io import atomic_path
from latentct.util.settings import save_settings


class RunDir:
    def __init__(self, folder: str, cfg, runtime: Runtime):
        self.path = Path(folder)
        self.runtime = runtime
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.board = None
        if runtime.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            save_settings(cfg, self.path / "config.json")
            if getattr(cfg, "tensorboard", False):
                self.board = _tensorboard(self.path / "tensorboard")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step; those steps run again."""
        if not self.runtime.is_main or not self.metrics.is_file():
            return
        keep = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if self.runtime.is_main:
            with open(self.metrics, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in _flatten(record).items():
                    self.board.add_scalar(key, value, record["step"])

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def plot_losses(self, keys: list[str]) -> None:
        """losses.png: each of ``keys`` from metrics.jsonl against the step."""
        if self.runtime.is_main:
            plot_losses(self.read_metrics(), keys, self.path / "losses.png")


def _tensorboard(folder: Path):
    """A SummaryWriter when the tensorboard package is installed (optional); None otherwise, with a note."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
              "metrics.jsonl is written as always")
        return None
    return SummaryWriter(str(folder))


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def plot_losses(records: list[dict], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1)
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
