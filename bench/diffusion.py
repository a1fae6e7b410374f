"""Benchmark: what a diffusion model costs on this machine, each figure against a reference in the same run.

    python -m bench.diffusion            # CPU: the sizes Training/TrainDiffusion.py --preset latent chose
    python -m bench.diffusion --gpu      # on a GPU: the pixel DDPM at 64 and 128 px, bf16 and compile
    python -m bench.diffusion --h-fit runs/benchmark-diffusion/diffusion/generator.pt --oracle ORACLE.pt

CPU: the autoencoder's and the UNet's training steps at the latent preset's widths against twice those widths
(why the preset is what it is) and with channels_last against without; one deterministic DDIM sample against one
VAE decoder call (what a diffusion generator costs every method, per image). GPU: the pixel preset's training
step and 20-step sampling throughput at 64 and 128 px, bf16 + compile against float32 eager.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentct.generators.diffusion import LATENT_SCHEDULE, PIXEL_SCHEDULE, DiffusionGenerator
from latentct.util.settings import parse_settings, setting


@dataclass
class Settings:
    """Diffusion training and sampling cost against references in the same run."""

    batch: int = setting(32, "images per training step")
    repeats: int = setting(5, "timed repeats after two warm-up calls")
    gpu: bool = setting(False, "run the GPU section (the pixel DDPM at 64 and 128 px)")
    h_fit: str | None = setting(None, "instead: a diffusion generator.pt whose h-view supervised fit is measured, raw "
                                "readings against readings paired with the same x_T without the edit (--oracle)")
    oracle: str | None = setting(None, "with --h-fit: the fit oracle (oracle.pt)")
    fit_samples: int = setting(1024, "with --h-fit: fit latents (half as many more test the fit)")
    threads: int | None = setting(None, "torch threads (default: torch's)")


def timed(fn, repeats: int) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def latent_args(ae_widths, unet_widths, side: int = 64) -> dict:
    ae = dict(in_channels=1, out_channels=1, num_res_blocks=1, channels=list(ae_widths),
              attention_levels=[False] * len(ae_widths), latent_channels=4, norm_num_groups=8,
              with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    unet = dict(in_channels=4, out_channels=4, num_res_blocks=1, channels=list(unet_widths),
                attention_levels=[False] * (len(unet_widths) - 1) + [True], norm_num_groups=16, num_head_channels=16)
    latent = side // 2 ** (len(ae_widths) - 1)
    return dict(unet=unet, autoencoder=ae, schedule=LATENT_SCHEDULE, scale_factor=1.0, sample_shape=[4, latent, latent])


def training_steps(args: dict, batch: int, repeats: int, layout) -> tuple[float, float]:
    """(autoencoder step, UNet step) in seconds."""
    model = DiffusionGenerator(**args).to(memory_format=layout)
    images = torch.rand(batch, 1, 64, 64).mul(2).sub(1).contiguous(memory_format=layout)
    latents = torch.randn(batch, *args["sample_shape"]).contiguous(memory_format=layout)
    steps = torch.randint(0, 1000, (batch,))
    ae_opt = torch.optim.Adam(model.autoencoder.parameters(), 1e-3)
    unet_opt = torch.optim.Adam(model.unet.parameters(), 3e-4)

    def ae_step():
        recon, mu, sigma = model.autoencoder(images)
        loss = (recon - images).abs().mean() + 1e-6 * (mu.pow(2) + sigma.pow(2)).mean()
        ae_opt.zero_grad()
        loss.backward()
        ae_opt.step()

    def unet_step():
        loss = F.mse_loss(model.unet(latents, steps), latents)
        unet_opt.zero_grad()
        loss.backward()
        unet_opt.step()

    return timed(ae_step, repeats), timed(unet_step, repeats)


def cpu(cfg: Settings) -> dict:
    from latentct.models.vae import Decoder

    chosen, wider = latent_args((16, 32, 32), (32, 64, 64)), latent_args((32, 64, 64), (64, 128, 128))
    out = {}
    for name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        out[name] = dict(zip(("autoencoder_s", "unet_s"), training_steps(chosen, cfg.batch, cfg.repeats, layout)))
    out["wider"] = dict(zip(("autoencoder_s", "unet_s"), training_steps(wider, cfg.batch, cfg.repeats,
                                                                       torch.channels_last)))
    G = DiffusionGenerator(**chosen).eval().configure(view="noise", ddim_steps=10)
    vae = Decoder(latent_dim=32, image_size=64, ch=16).eval()
    z, zv = torch.randn(cfg.batch, G.latent_dim), torch.randn(cfg.batch, 32)
    with torch.no_grad():
        sample = timed(lambda: G(z), cfg.repeats)
        decode = timed(lambda: vae(zv), cfg.repeats)
    out["sample_s_per_image"], out["vae_decode_s_per_image"] = sample / cfg.batch, decode / cfg.batch
    cl, ct, wd = out["channels_last"], out["contiguous"], out["wider"]
    print(f"latent preset, batch {cfg.batch}, {torch.get_num_threads()} threads:")
    print(f"  autoencoder step {cl['autoencoder_s']:.3f} s (channels_last) vs {ct['autoencoder_s']:.3f} s "
          f"contiguous: {ct['autoencoder_s'] / cl['autoencoder_s']:.2f}x; twice the widths "
          f"{wd['autoencoder_s']:.3f} s ({wd['autoencoder_s'] / cl['autoencoder_s']:.2f}x the chosen)")
    print(f"  UNet step {cl['unet_s']:.3f} s (channels_last) vs {ct['unet_s']:.3f} s contiguous: "
          f"{ct['unet_s'] / cl['unet_s']:.2f}x; twice the widths {wd['unet_s']:.3f} s "
          f"({wd['unet_s'] / cl['unet_s']:.2f}x the chosen)")
    print(f"  a 10-step DDIM sample {1e3 * out['sample_s_per_image']:.1f} ms/image vs a VAE decoder call "
          f"{1e3 * out['vae_decode_s_per_image']:.2f} ms/image: {sample / decode:.0f}x")
    return out


def gpu(cfg: Settings) -> dict:
    """The pixel preset (MONAI's DDPM tutorial widths) at 64 and 128 px: training images/s and sampling
    images/s, bf16 + compile against float32 eager."""
    from Training.TrainDiffusion import PRESETS

    preset = PRESETS["pixel"]
    out = {}
    for side in (64, 128):
        args = dict(unet=dict(in_channels=1, out_channels=1, num_res_blocks=1, channels=list(preset["unet_channels"]),
                              attention_levels=list(preset["attention"]), norm_num_groups=32, num_head_channels=256),
                    autoencoder=None, schedule=PIXEL_SCHEDULE, scale_factor=1.0, sample_shape=[1, side, side])
        for name, fast in (("eager_fp32", False), ("bf16_compile", True)):
            model = DiffusionGenerator(**args).cuda()
            unet = torch.compile(model.unet) if fast else model.unet
            opt = torch.optim.Adam(model.unet.parameters(), 1e-4)
            x = torch.randn(64, 1, side, side, device="cuda")
            t = torch.randint(0, 1000, (64,), device="cuda")

            def step():
                with torch.autocast("cuda", torch.bfloat16, enabled=fast):
                    loss = F.mse_loss(unet(x, t).float(), x)
                opt.zero_grad()
                loss.backward()
                opt.step()

            seconds = timed(step, cfg.repeats)
            model.eval().configure(view="noise", ddim_steps=20)
            z = torch.randn(64, model.latent_dim, device="cuda")
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=fast):
                sampling = timed(lambda: model(z), 2)
            out[f"{side}px_{name}"] = {"train_images_per_s": 64 / seconds, "sample_images_per_s": 64 / sampling}
        e, f = out[f"{side}px_eager_fp32"], out[f"{side}px_bf16_compile"]
        print(f"pixel DDPM {side} px: training {f['train_images_per_s']:.0f} img/s (bf16 + compile) vs "
              f"{e['train_images_per_s']:.0f} eager fp32 ({f['train_images_per_s'] / e['train_images_per_s']:.2f}x); "
              f"20-step sampling {f['sample_images_per_s']:.0f} vs {e['sample_images_per_s']:.0f} img/s")
    return out


def h_fit(cfg: Settings) -> dict:
    """Held-out R2 of the h view's linear fit (dh in the top 128 principal components of h, each with its own
    spread) on raw readings and on readings paired with the same x_T's unedited image: the same latents and images."""
    from latentct.discover.baselines import fit_directions, readings_of
    from latentct.generators.interface import load_generator
    from latentct.score.oracle import load_oracle

    G = load_generator(cfg.h_fit, diffusion={"view": "h"})
    oracle = load_oracle(cfg.oracle)
    basis, spread = G.fit_basis()
    gen = torch.Generator().manual_seed(17)
    z = G.fit_latents(cfg.fit_samples + cfg.fit_samples // 2, gen)
    edited = readings_of(G, oracle, G.window, z)
    plain_z = z.clone()
    plain_z[:, G.x_dim:] = 0
    plain = readings_of(G, oracle, G.window, plain_z)
    out = {}
    for name, readings in (("raw", edited), ("paired", edited - plain)):
        _, info = fit_directions(z, readings, cfg.fit_samples, basis=basis, scales=spread)
        out[name] = info["fit_r2"]
        print(f"h-view fit, {name} readings: held-out R2 " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                      info["fit_r2"].items()))
    return out


def main(cfg: Settings) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.h_fit:
        result = {"h_fit": h_fit(cfg)}
    else:
        result = {"cpu": cpu(cfg)} if not cfg.gpu else {"gpu": gpu(cfg)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(parse_settings(Settings, prog="python -m bench.diffusion"))
