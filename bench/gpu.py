"""The GPU sections of the benchmarks as one script, for the minutes a GPU is lent:

    python -m bench.gpu [--steps 30] [--out gpu_results.json]

1. Training steps at the paper's size (128 px, widths 128, batch 128) with each speed switch (bf16, channels_last,
   torch.compile) on and off, through the training scripts themselves (bench/train.py: gpu_switches).
2. The direction step at the same size against the original code's form (bench/directions.py: gpu_rows).
Every configuration is timed in this one run on this one GPU and reported as a ratio to its reference; one
that fails is reported with its error and the others still run.
"""
from __future__ import annotations

import json
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import directions as bench_directions
from bench import train as bench_train
from latentct.util.settings import parse_settings, setting


@dataclass
class Settings:
    """Every GPU benchmark, one table."""

    steps: int = setting(30, "timed steps per configuration")
    data: str = setting("data/bench_train", "where the benchmark dataset is cached")
    out: str = setting("gpu_results.json", "the results as JSON")
    sections: list[str] = setting(["train", "directions_script", "directions_lenet", "directions_resnet"],
                                  "which sections to run")
    switches: list[str] = setting(list(bench_train.SWITCHES), "which training-switch configurations to time")


def directions_script(tmp: Path, steps: int) -> dict:
    """TrainDirections.py on the GPU with its defaults there (bf16, compile): steps/s and the RCA it writes."""
    from Training import TrainDirections

    out = tmp / "directions"
    args = ["--generator", str(tmp / "gpu_gan_defaults" / "generator.pt"), "--output", str(out), "--steps",
            str(4 * steps), "--batch-size", "128", "--log-every", str(steps), "--eval-every", str(4 * steps),
            "--rca-batches", "10", "--sample-every", "1000000", "--checkpoint-every", "1000000"]
    eval_ = TrainDirections.main(parse_settings(TrainDirections.Settings, args))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "step_time" in line]
    return {"steps_per_s_after_compile": 1 / (sum(r["step_time"] for r in rows[1:]) / len(rows[1:])),
            "rca": eval_.get("rca")}


def main(cfg: Settings) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no GPU here")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    started = time.time()
    tmp = Path(tempfile.mkdtemp())
    for name, run in (("train", lambda: bench_train.gpu_switches(tmp, bench_train.Settings(steps=cfg.steps,
                                                                                            data=cfg.data), cfg.switches)),
                      ("directions_script", lambda: directions_script(tmp, cfg.steps)),
                      ("directions_lenet", lambda: bench_directions.gpu_rows(bench_directions.Settings(steps=cfg.steps))),
                      ("directions_resnet", lambda: bench_directions.gpu_rows(bench_directions.Settings(
                          steps=cfg.steps, reconstructor="resnet")))):
        if name not in cfg.sections:
            continue
        try:
            result[name] = run()
        except Exception as err:  # report and go on: the other sections still give figures
            traceback.print_exc()
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        result[f"{name}_seconds"] = round(time.time() - started, 1)
        Path(cfg.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main(parse_settings(Settings))
