"""Benchmark: steps/s of the direction trainer's step against the original code's step, same run.

    python -m bench.directions [--image-size 64] [--steps 20]

Naive reference (the original): two generator calls, both with graphs, G's weight gradients computed and
thrown away. Ours: G frozen, G(z) under no_grad, only the shifted branch carries a graph ("split"), and the
alternative one call on the concatenated batch ("concat"). Each also with channels_last. On a GPU, the same at
128 px with bf16 and torch.compile switched on and off. Target: at least 1.5x on CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from latentct.discover.directions import make_shifts, step_losses
from latentct.models.dcgan import Generator, weights_init
from latentct.models.deformator import Deformator
from latentct.models.reconstructor import make_reconstructor
from latentct.util.settings import parse_settings, setting


@dataclass
class Settings:
    """Direction-training step throughput against the original code's form."""

    image_size: int = setting(64, "generator output size")
    ngf: int = setting(64, "generator width")
    batch_size: int = setting(64, "pairs per step")
    directions_count: int = setting(32, "K")
    reconstructor: str = setting("lenet", "lenet or resnet", choices=("lenet", "resnet"))
    steps: int = setting(20, "timed steps per form (after 3 warm-up steps)")


def time_form(form: str, cfg: Settings, device, channels_last=False, bf16=False, compiled=False) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    raw_G = Generator(32, cfg.image_size, cfg.ngf).apply(weights_init).to(device, memory_format=layout).eval()
    raw_G.requires_grad_(form == "naive")
    deformator = Deformator("proj", cfg.directions_count, 32).to(device)
    raw_reconstructor = make_reconstructor(cfg.reconstructor, cfg.directions_count).to(device, memory_format=layout)
    G, reconstructor = (torch.compile(raw_G), torch.compile(raw_reconstructor)) if compiled else \
        (raw_G, raw_reconstructor)
    params = list(deformator.parameters()) + list(raw_reconstructor.parameters())
    opt = torch.optim.Adam(params, 1e-4)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def step():
        z = torch.randn(cfg.batch_size, 32, device=device)
        idx, eps, basis = make_shifts(cfg.batch_size, cfg.directions_count, 6.0, 0.5, "uniform", device)
        opt.zero_grad(set_to_none=True)
        if form == "naive":
            raw_G.zero_grad(set_to_none=True)
        with ctx:
            loss, *_ = step_losses(G, deformator, reconstructor, z, idx, eps, basis, 1.0, 0.25, form)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cfg.steps / (time.perf_counter() - started)


def main(cfg: Settings) -> dict:
    device = torch.device("cpu")
    naive = time_form("naive", cfg, device)
    rows = {"naive (original)": naive}
    for form in ("split", "concat"):
        rows[form] = time_form(form, cfg, device)
        rows[f"{form} + channels_last"] = time_form(form, cfg, device, channels_last=True)
    print(f"\ndirection-step benchmark, CPU, {cfg.image_size}px, ngf {cfg.ngf}, batch {cfg.batch_size}, "
          f"K {cfg.directions_count}, {cfg.reconstructor}")
    for name, value in rows.items():
        print(f"  {name:24s} {value:7.2f} steps/s  {value / naive:5.2f}x")
    result = {"cpu": rows, "methods": method_steps(cfg, rows["split + channels_last"])}
    if torch.cuda.is_available():
        result["gpu"] = gpu_rows(cfg)
    return result


def method_steps(cfg: Settings, voynov: float) -> dict:
    """One step of each other discovery method against the Voynov step (split + channels_last, the default) in
    the same run: DisCo and LatentCLR at their demo presets, and the time to compute the spectral directions."""
    from latentct.discover.baselines import spectral
    from latentct.generators.features import default_layer, layer_features
    from Training import TrainDisCo, TrainLatentCLR

    torch.manual_seed(0)
    G = Generator(32, cfg.image_size, cfg.ngf).apply(weights_init).eval().requires_grad_(False)
    K = cfg.directions_count
    out = {}

    disco_cfg = TrainDisCo.Settings(**TrainDisCo.PRESETS["demo"])
    navigator = Deformator("proj", K, 32, random_init=True)
    encoder = TrainDisCo.VariationEncoder(cfg.image_size, disco_cfg.code_size, disco_cfg.encoder_width)
    opt = torch.optim.Adam([*navigator.parameters(), *encoder.parameters()], 1e-3)

    def disco_step():
        loss, *_ = TrainDisCo.disco_losses(G, navigator, encoder, disco_cfg, K, 32, "cpu")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    clr_cfg = TrainLatentCLR.Settings(**TrainLatentCLR.PRESETS["demo"])
    directions = TrainLatentCLR.GlobalDirections(K, 32)
    features = layer_features(G, default_layer(G))
    clr_opt = torch.optim.Adam(directions.parameters(), 1e-3)

    def clr_step():
        z = torch.randn(clr_cfg.batch_size, 32)
        with torch.no_grad():
            base = torch.nn.functional.normalize(features(z), dim=1)
        moved = torch.nn.functional.normalize(features((z[None] + clr_cfg.alpha * directions.unit()[:, None])
                                                       .reshape(K * clr_cfg.batch_size, -1)), dim=1)
        loss, _ = TrainLatentCLR.contrastive_loss(torch.nn.functional.normalize(moved - base.repeat(K, 1), dim=1), K,
                                                  clr_cfg.temperature)
        clr_opt.zero_grad(set_to_none=True)
        loss.backward()
        clr_opt.step()

    for name, step in (("disco (demo preset)", disco_step), ("latentclr (demo preset)", clr_step)):
        for _ in range(2):
            step()
        started = time.perf_counter()
        for _ in range(cfg.steps):
            step()
        out[name] = cfg.steps / (time.perf_counter() - started)
    started = time.perf_counter()
    spectral(G, K, samples=64)
    out["spectral: seconds for all directions"] = time.perf_counter() - started
    print(f"other methods, CPU (the Voynov step, split + channels_last: {voynov:.2f} steps/s):")
    for name, value in out.items():
        print(f"  {name:38s} {value:7.2f}" + ("" if name.startswith("spectral") else f" steps/s  {value / voynov:5.2f}x"))
    return out


def gpu_rows(cfg: Settings) -> dict:
    """The paper's size on a GPU (128 px, widths 128, batch 128): each speed switch against the original step."""
    gpu = torch.device("cuda")
    big = Settings(image_size=128, ngf=128, batch_size=128, directions_count=32, reconstructor=cfg.reconstructor,
                   steps=cfg.steps)
    base = time_form("naive", big, gpu)
    out = {"naive": base}
    for name, kw in {"split": {}, "split+bf16": {"bf16": True}, "split+compile": {"compiled": True},
                     "split+bf16+compile": {"bf16": True, "compiled": True},
                     "split+bf16+channels_last": {"bf16": True, "channels_last": True},
                     "concat+bf16": {"bf16": True}}.items():
        out[name] = time_form(name.split("+")[0], big, gpu, **kw)
    print(f"GPU ({torch.cuda.get_device_name(0)}), 128 px, paper widths, {cfg.reconstructor}:")
    for name, value in out.items():
        print(f"  {name:24s} {value:7.2f} steps/s  {value / base:5.2f}x")
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(parse_settings(Settings)), default=float))
