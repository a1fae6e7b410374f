"""Benchmark: images/s of one DCGAN step and one VAE step against a naive reference in the same run.

    python -m bench.train [--image-size 64] [--steps 40]

Naive reference: a plain fp32 loop fed by a DataLoader whose dataset augments one sample at a time (as the
original code did). Ours: the training scripts themselves (batched augmentation, workers on the memory map;
on a GPU the resident dataset, bf16, channels_last, compile). On a GPU the paper preset at 128 px is also
timed with each speed switch on and off, with the share of the step spent waiting for data.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import preprocess
from latentct.data import phantom
from latentct.data.slices import CTSlices, random_affine
from latentct.models.dcgan import Discriminator, Generator, weights_init
from latentct.models.vae import VAE, kl_divergence
from latentct.util.settings import load_settings, parse_settings, setting
from Training import TrainGAN, TrainVAE


@dataclass
class Settings:
    """Training-step throughput against a naive reference."""

    image_size: int = setting(64, "image size for the CPU comparison")
    steps: int = setting(40, "timed steps per configuration (after warm-up)")
    batch_size: int = setting(64, "images per step")
    data: str = setting("data/bench_train", "where the benchmark dataset is cached")
    workers: int = setting(2, "DataLoader workers")


class PerSampleAugmented(torch.utils.data.Dataset):
    """The naive way: augment each slice alone inside __getitem__."""

    def __init__(self, folder):
        self.inner = CTSlices(folder, "train")

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return random_affine(self.inner[i][None])[0]


def naive_images_per_s(kind: str, folder: str, cfg: Settings, gan_args: dict, vae_args: dict) -> float:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(PerSampleAugmented(folder), batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=cfg.workers, drop_last=True)
    if kind == "gan":
        G, D = Generator(**gan_args["G"]).apply(weights_init), Discriminator(**gan_args["D"]).apply(weights_init)
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))
    else:
        model = VAE(**vae_args)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
    done, started = 0, None
    while done < cfg.steps + 3:
        for real in loader:
            if done == 3:
                started = time.perf_counter()
            if kind == "gan":
                fake = G(torch.randn(real.shape[0], gan_args["G"]["latent_dim"]))
                opt_d.zero_grad()
                loss_d = F.relu(1 - D(real)).mean() + F.relu(1 + D(fake.detach())).mean()
                loss_d.backward()
                opt_d.step()
                opt_g.zero_grad()
                (-D(fake).mean()).backward()
                opt_g.step()
            else:
                recon, mu, logvar = model(real)
                loss = F.mse_loss(recon, real) + 0.01 * kl_divergence(mu, logvar)
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
            if done == cfg.steps + 3:
                break
    return cfg.steps * cfg.batch_size / (time.perf_counter() - started)


def script_images_per_s(module, folder: str, out: Path, steps: int, extra: list[str]) -> tuple[float, float]:
    """Run a training script for ``steps`` steps; images/s and data-wait share after the first log interval."""
    log = max(steps // 4, 1)
    cfg = parse_settings(module.Settings, ["--preset", "demo", "--data", folder, "--output", str(out),
                                           "--steps", str(steps + log), "--log-every", str(log),
                                           "--eval-every", "1000000", "--sample-every", "1000000",
                                           "--checkpoint-every", "1000000", "--eval-samples", "8", *extra],
                         presets=module.PRESETS)
    module.main(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r][1:]
    return (sum(r["images_per_s"] for r in rows) / len(rows),
            sum(r.get("data_wait_share", 0) for r in rows) / len(rows))


def ensure_dataset(folder: Path, size: int) -> str:
    tree = folder / "tree"
    want = phantom.Settings(output=str(tree), patients=16, slices=40, size=max(2 * size, 128), overwrite=True)
    if not (tree / "config.json").is_file() or load_settings(phantom.Settings, tree / "config.json") != want:
        phantom.write_phantom(want)
    out = folder / f"slices_{size}"
    if not (out / "manifest.json").is_file():
        preprocess.main(preprocess.Settings(input=str(tree), output=str(out), size=size, overwrite=True))
    return str(out)


def main(cfg: Settings) -> dict:
    folder = ensure_dataset(Path(cfg.data), cfg.image_size)
    common = ["--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers)]
    gan_args = {"G": dict(latent_dim=32, image_size=cfg.image_size, ngf=32),
                "D": dict(image_size=cfg.image_size, ndf=32, spectral=True, minibatch_std=True)}
    vae_args = dict(latent_dim=32, image_size=cfg.image_size, ch=16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, module in (("gan", TrainGAN), ("vae", TrainVAE)):
            naive = naive_images_per_s(kind, folder, cfg, gan_args, vae_args)
            ours, wait = script_images_per_s(module, folder, Path(tmp) / kind, cfg.steps, common)
            cl, _ = script_images_per_s(module, folder, Path(tmp) / f"{kind}_cl", cfg.steps,
                                        common + ["--channels-last", "on"])
            rows.append((kind, naive, ours, cl, wait))
        print(f"\ntraining-step benchmark, {cfg.image_size}px, batch {cfg.batch_size}, "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
        print(f"{'model':6s} {'naive img/s':>12s} {'ours img/s':>11s} {'ratio':>6s} {'+channels_last':>15s} "
              f"{'data wait':>10s}")
        for kind, naive, ours, cl, wait in rows:
            print(f"{kind:6s} {naive:12.1f} {ours:11.1f} {ours / naive:5.2f}x {cl / naive:14.2f}x {wait:9.1%}")
        result = {kind: {"naive": n, "ours": o, "ratio": o / n, "channels_last_ratio": c / n, "data_wait": w}
                  for kind, n, o, c, w in rows}
        if torch.cuda.is_available():
            result["gpu"] = gpu_switches(Path(tmp), cfg)
    return result


SWITCHES = {"defaults": [],  # bf16 and compile on, channels_last off (auto on a GPU)
            "no_bf16": ["--bf16", "off"],
            "no_compile": ["--compile", "off"],
            "no_compile_channels_last": ["--compile", "off", "--channels-last", "on"],
            "all_off": ["--bf16", "off", "--channels-last", "off", "--compile", "off"]}


def gpu_switches(tmp: Path, cfg: Settings, names=tuple(SWITCHES)) -> dict:
    """The paper preset at 128 px with each speed switch on and off (GPU only)."""
    folder = ensure_dataset(Path(cfg.data), 128)
    out = {}
    for kind, module in (("gan", TrainGAN), ("vae", TrainVAE)):
        base = ["--batch-size", "128", "--ngf", "128", "--ndf", "128"] if kind == "gan" else \
            ["--batch-size", "128", "--width", "64"]
        for name in names:
            flags = SWITCHES[name]
            try:
                ips, wait = script_images_per_s(module, folder, tmp / f"gpu_{kind}_{name}", cfg.steps, base + flags)
            except Exception as err:  # one switch failing must not hide the others' figures
                out[f"{kind}_{name}"] = {"error": f"{type(err).__name__}: {err}"}
                print(f"GPU {kind:4s} {name:18s} failed: {type(err).__name__}: {err}")
                continue
            out[f"{kind}_{name}"] = {"images_per_s": ips, "data_wait": wait,
                                     "ratio_to_all_off": None}
            print(f"GPU {kind:4s} {name:18s} {ips:10.1f} img/s  data wait {wait:5.1%}")
        off = out.get(f"{kind}_all_off", {}).get("images_per_s")
        for name in names:
            row = out.get(f"{kind}_{name}", {})
            if off and "images_per_s" in row:
                row["ratio_to_all_off"] = row["images_per_s"] / off
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(parse_settings(Settings)), default=float))
