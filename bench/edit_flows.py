"""How much of each factor's image change the steering walks' six edits can explain, per generator of a run.

    python -m bench.edit_flows --run demo [--latents 64]

The steering walks (latentct/discover/unmix.py, ``by_steer``) fit each of six edits of the body (shift, scale,
roll, shear) by the latent direction whose first-order image change best reproduces that edit's flow; they can
single out a factor only as far as the factor's own image change is that edit. This takes the run's supervised
directions (runs/<run>/<gen>_supervised/directions.pt: the oracle-fitted factor directions, used here only to
measure) and, over latents of the prior, the share of each one's first-order image change that one edit's flow
explains alone (pooled least squares) and that the six explain together (least squares per latent). Writes
Animations/<run>/edit_flows.json. Seconds per generator at demo size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentct.data.phantom import FACTORS
from latentct.discover.unmix import EDITS, edit_residual, flows_and_changes, unexplained_share
from latentct.generators.interface import load_generator, sample_latents
from latentct.util.io import atomic_write_json
from latentct.util.settings import UserError, check, run_cli, setting


@dataclass
class Settings:
    """The edits' share of each supervised factor direction's image change, per generator of a finished run."""

    run: str = setting("demo", "the finished pipeline run (runs/<run>/<gen>/generator.pt and <gen>_supervised)")
    root: str = setting(".", "folder that holds runs/ and Animations/")
    generators: list[str] = setting(["dcgan", "vae"], "generators of the run to measure")
    latents: int = setting(64, "latents of the prior the shares are pooled over (the walks' 64)")
    seed: int = setting(3, "seed of those latents")

    def __post_init__(self):
        check(self.latents >= 1, "latents", f"must be at least 1, got {self.latents}")


def edit_shares(G, directions: torch.Tensor, latents: int = 64, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the (k, d) ``directions``: (k, 6) the share of its first-order image change, over ``latents``
    latents of the prior, that each edit of EDITS explains alone at its best scale (the squared cosine of the
    pooled change with the pooled flow), and (k,) the share the six explain together, fitted at each latent."""
    unit = torch.nn.functional.normalize(directions.double(), dim=1)
    z = sample_latents(G, latents, torch.Generator().manual_seed(seed))
    flows, change = flows_and_changes(G, unit, z)                                        # (N, 6, P), (N, k, P)
    alone = (torch.einsum("nkp,nep->ke", change, flows).square()
             / (flows.square().sum((0, 2))[None, :] * change.square().sum((0, 2))[:, None]).clamp_min(1e-30))
    together = 1 - unexplained_share(change, edit_residual(flows, change), torch.eye(len(unit), dtype=change.dtype))
    return alone, together


def main(cfg: Settings) -> dict:
    root = Path(cfg.root)
    paths = {gen: (root / "runs" / cfg.run / gen / "generator.pt",
                   root / "runs" / cfg.run / f"{gen}_supervised" / "directions.pt") for gen in cfg.generators}
    for gen, files in paths.items():   # every file checked before any work
        for path in files:
            if not path.is_file():
                raise UserError(f"--run {cfg.run}: {path} not found (run the pipeline with the supervised method "
                                f"on {gen} first)")
    out = {"run": cfg.run, "latents": cfg.latents, "seed": cfg.seed, "edits": list(EDITS), "generators": {}}
    print(f"share of each supervised factor direction's image change the edits explain ({cfg.latents} latents)")
    print(f"{'generator':10s} {'factor':12s} " + " ".join(f"{e:>9s}" for e in EDITS) + f" {'all six':>8s}")
    for gen, (generator, supervised) in paths.items():
        G = load_generator(str(generator)).eval().requires_grad_(False)
        matrix = torch.load(supervised, weights_only=True)["matrix"]
        alone, together = edit_shares(G, matrix, cfg.latents, cfg.seed)
        rows = {}
        for f, name in enumerate(FACTORS[:len(matrix)]):
            rows[name] = {"alone": [round(float(v), 4) for v in alone[f]], "together": round(float(together[f]), 4)}
            print(f"{gen:10s} {name:12s} " + " ".join(f"{float(v):9.2f}" for v in alone[f])
                  + f" {float(together[f]):8.2f}")
        out["generators"][gen] = rows
    atomic_write_json(root / "Animations" / cfg.run / "edit_flows.json", out)
    return out


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m bench.edit_flows")
